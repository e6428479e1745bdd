"""`flux serve`'s HTTP side: the OpenAI Images API (generations, edits, models), health, Prometheus metrics and a
one-page UI, in front of the single model-owning worker (flux/serve/worker.py).

Routes:
    GET  /                       the page (flux/serve/page.html)
    GET  /health                 200 while the worker runs (open without a key: a load balancer's readiness probe)
    GET  /metrics                Prometheus text: queue length, requests by status, seconds per image
    GET  /v1/models              the OpenAI list shape, one entry: the served model
    POST /v1/images/generations  JSON, as the OpenAI SDK's images.generate sends it
    POST /v1/images/edits        multipart, as images.edit sends it

A request waits for its images on an asyncio queue the worker feeds. While it waits, the handler watches for the
client leaving and for --request-timeout; either cancels the job, which stops at the next step boundary. With
`stream` the answer is server-sent events in the OpenAI shape: `image_generation.partial_image` (or
`image_edit.partial_image`) with a preview every few steps, then one `...completed` event per image.
"""

import asyncio
import base64
import json
import logging
import secrets
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from flux.serve.fields import (EDIT_FIELDS, GENERATION_FIELDS, APIError, edit_area, edit_size, invalid, read_image,
                               read_request)
from flux.serve.worker import Job, QueueFull, Worker

log = logging.getLogger("flux")
PAGE = Path(__file__).with_name("page.html")
DISCONNECT_POLL = 0.1  # seconds between checks for a client that left, while its request waits


def create_app(pipe, *, model_id: str, model_name: str, api_key: str | None = None, max_queue: int = 64,
               max_batch: int = 4, request_timeout: float | None = None) -> FastAPI:
    """The server for a loaded `flux.Pipeline`. `model_id` is what /v1/models lists and `model` must equal;
    `model_name` is written into PNGs, as `flux generate` writes its --model. The worker thread starts and stops
    with the app (its lifespan)."""
    metrics = CollectorRegistry()
    requests_total = Counter("flux_requests", "HTTP requests by route and status", ["route", "status"],
                             registry=metrics)
    image_seconds = Histogram("flux_image_seconds", "Seconds of worker time per image (batch time / batch size)",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 150), registry=metrics)
    batch_images = Histogram("flux_batch_images", "Images per batch the worker ran", buckets=(1, 2, 4, 8, 16, 32, 64),
                             registry=metrics)
    queue_length = Gauge("flux_queue_length", "Requests waiting for the worker", registry=metrics)

    def on_batch(images: int, seconds: float) -> None:
        batch_images.observe(images)
        for _ in range(images):
            image_seconds.observe(seconds)
    defaults = pipe.defaults
    default_size = (defaults.image_size, defaults.image_size)
    created = int(time.time())

    async def lifespan(app):
        app.state.worker = Worker(pipe, max_queue=max_queue, max_batch=max_batch,
                                  on_batch=on_batch)
        queue_length.set_function(app.state.worker.queue_length)
        yield
        app.state.worker.stop()

    app = FastAPI(title="flux serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_CountResponses, counter=requests_total)

    # Errors: every refusal in the OpenAI shape; FastAPI's own (404 for an unknown path, 405) too.
    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return JSONResponse(APIError(error.status_code, str(error.detail), kind=kind).body(),
                            status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error):
        return JSONResponse(invalid(None, str(error)).body(), status_code=400)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/", response_class=HTMLResponse)
    async def page():
        settings = {"model": model_id, "size": default_size, "steps": defaults.num_steps, "needsKey": api_key is not None}
        return PAGE.read_text(encoding="utf-8").replace("__FLUX_SETTINGS__", json.dumps(settings))

    @app.get("/health")
    async def health(request: Request):
        if not request.app.state.worker.alive():
            return JSONResponse({"status": "worker stopped"}, status_code=503)
        return {"status": "ok", "model": model_id, "queue": request.app.state.worker.queue_length()}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str):
        authorize(request)
        if name != model_id:
            raise APIError(404, f"the model {name!r:.80} is not served here; this server serves {model_id!r}",
                           param="model", code="model_not_found")
        return model_card()

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "flux"}

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        authorize(request)
        body = await request.body()
        try:
            fields = json.loads(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise invalid(None, f"the body is not valid JSON: {error}", code="invalid_json") from None
        if not isinstance(fields, dict):
            raise invalid(None, "the body must be a JSON object", code="invalid_json")
        options = read_request(fields, allowed=GENERATION_FIELDS, form=False, model_id=model_id,
                               default_size=default_size, default_steps=defaults.num_steps)
        if pipe.variant in ("fill", "control"):  # they draw from a picture (and a mask) or a control image
            needs = "an image and a mask: send them to /v1/images/edits" if pipe.variant == "fill" else \
                "a control image (an edge or depth map), which the OpenAI API has no field for"
            raise invalid(None, f"{model_id} is a FLUX.1 {pipe.variant} model: it does not generate from a prompt "
                          f"alone; it needs {needs}", code="unsupported_value")
        return await run(request, options, event="image_generation")

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        authorize(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise invalid(None, "an edit is sent as multipart/form-data (as the OpenAI SDK's images.edit sends it)",
                          code="invalid_multipart")
        try:
            form = await request.form()
        except Exception as error:  # noqa: BLE001 - python-multipart's errors: a malformed body
            raise invalid(None, f"the multipart body cannot be read: {getattr(error, 'detail', error)}",
                          code="invalid_multipart") from None
        uploads = form.getlist("image") + form.getlist("image[]")
        if not uploads:
            raise invalid("image", "image is required: the picture to edit, as a file", code="missing_required_parameter")
        if not all(isinstance(upload, UploadFile) for upload in uploads):
            raise invalid("image", "image must be a file upload, not a text field")
        images = [read_image(await upload.read(), "image") for upload in uploads]
        mask = form.get("mask")
        if mask is not None and not isinstance(mask, UploadFile):
            raise invalid("mask", "mask must be a file upload, not a text field")
        mask = None if mask is None else read_image(await mask.read(), "mask")
        text = {key: value for key, value in form.multi_items() if key not in ("image", "image[]", "mask")}
        variant = pipe.variant
        if "size" not in text:  # without a size, the edit comes out at the size the picture gives it
            text["size"] = "{}x{}".format(*edit_size(images[0], default_size, variant=variant,
                                                     auto_resize=text.get("auto_resize") != "false"))
        options = read_request(text, allowed=EDIT_FIELDS, form=True, model_id=model_id, default_size=default_size,
                               default_steps=defaults.num_steps)
        refuse_edit(variant, images=images, mask=mask, options=options)
        if variant == "kontext":  # every picture is a reference, read by the model beside the prompt
            return await run(request, options, references=[picture.convert("RGB") for picture in images],
                             event="image_edit")
        picture = images[0].convert("RGB")
        if variant == "fill":  # repaints the mask's area; strength < 1 starts it from the picture, partly noised
            return await run(request, options, image=picture, mask=edit_area(mask),
                             strength=1.0 if options.strength is None else options.strength, event="image_edit")
        return await run(request, options, image=picture, event="image_edit",
                         strength=0.8 if options.strength is None else options.strength)

    def refuse_edit(variant: str, *, images, mask, options) -> None:
        """A 400 naming the field for an edit the served model cannot make."""
        if variant == "control":  # the OpenAI API has no field for an edge or depth map
            raise invalid("image", f"{model_id} is a FLUX.1 Canny/Depth model: it is steered by a control image "
                          "(an edge or depth map), which the OpenAI edits API has no field for; use flux.Pipeline "
                          "or `flux generate --control-image`", code="unsupported_value")
        if variant != "kontext" and options.auto_resize is not None:
            raise invalid("auto_resize", "auto_resize is for a FLUX.1 Kontext model (it resizes the references); "
                          f"{model_id} is a {variant} model", code="unsupported_value")
        if variant == "kontext":
            if mask is not None:
                raise invalid("mask", f"{model_id} is a FLUX.1 Kontext model: it edits the whole picture as the "
                              "prompt says, without a mask; inpainting a masked area needs a FLUX.1 Fill model",
                              code="unsupported_value")
            if options.strength is not None:
                raise invalid("strength", f"{model_id} is a FLUX.1 Kontext model: it takes the image(s) as "
                              "references, not as a starting point; strength is for image-to-image and Fill",
                              code="unsupported_value")
            return
        if len(images) > 1:
            raise invalid("image", f"{model_id} is a {variant} model: it edits one image; several reference "
                          "images need a FLUX.1 Kontext model", code="unsupported_value")
        if variant == "text-to-image" and mask is not None:
            raise invalid("mask", f"{model_id} is a text-to-image model: it edits by image-to-image (with "
                          "`strength`), and inpainting with a mask needs a FLUX.1 Fill model", code="unsupported_value")
        if variant == "fill" and mask is None:
            raise invalid("mask", f"{model_id} is a FLUX.1 Fill model: an edit needs a mask (transparent, or "
                          "white where no alpha, marks the area to repaint)", code="missing_required_parameter")
        if variant == "fill" and mask.size != images[0].size:
            raise invalid("mask", "mask must have the size of the image ({}x{}), got {}x{}".format(
                          *images[0].size, *mask.size))

    async def run(request: Request, options, *, event: str, image=None, mask=None, references=None, strength=None):
        """Queue the job, then answer with its images (JSON) or stream its events (SSE)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def notify(kind, payload):  # called from the worker thread
            if kind == "progress" and not options.stream:
                return
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
            except RuntimeError:  # the event loop has closed: the server is shutting down
                pass

        job = Job(prompt=options.prompt, seeds=options.seeds, width=options.width, height=options.height,
                  steps=options.steps, notify=notify, guidance=options.guidance,
                  negative_prompt=options.negative_prompt, true_cfg_scale=options.true_cfg_scale, image=image,
                  mask=mask, references=references, strength=strength, auto_resize=options.auto_resize,
                  output_format=options.output_format,
                  output_compression=options.output_compression, model_name=model_name)
        if options.stream:  # `partial_images` previews, or by default one every second step
            job.previews = options.partial_images if options.partial_images is not None else (job.steps_run() - 1) // 2
        worker = request.app.state.worker
        try:
            worker.submit(job)
        except QueueFull as error:
            raise APIError(429, str(error), code="queue_full", kind="rate_limit_error",
                           headers={"Retry-After": str(error.retry_after)}) from None
        deadline = None if request_timeout is None else loop.time() + request_timeout
        size = f"{options.width}x{options.height}"
        common = {"created_at": int(time.time()), "size": size, "quality": "auto", "background": "opaque",
                  "output_format": options.output_format}

        async def next_event():
            """The job's next event; None when the client left; APIError(504) past the deadline."""
            while True:
                if deadline is not None and loop.time() > deadline:
                    worker.cancel(job)
                    raise APIError(504, f"the request took longer than the server's limit of {request_timeout:g} s "
                                   "(--request-timeout); it was stopped", code="timeout", kind="timeout_error")
                wait = DISCONNECT_POLL if deadline is None else max(0.0, min(DISCONNECT_POLL, deadline - loop.time()))
                try:
                    return await asyncio.wait_for(events.get(), wait)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        worker.cancel(job)
                        return None

        if not options.stream:
            images = []
            try:
                while True:
                    item = await next_event()
                    if item is None:
                        return Response(status_code=499)  # nobody reads it: the client has gone
                    kind, payload = item
                    if kind == "error":
                        raise failure(payload)
                    if kind == "images":
                        images += payload
                    if kind == "done":
                        break
            finally:
                if not job.cancelled.is_set() and job.finished < job.count:
                    worker.cancel(job)
            data = [{"b64_json": base64.b64encode(data).decode(), "seed": seed} for _, seed, data in sorted(images)]
            return {"created": int(time.time()), "data": data, "size": size, "output_format": options.output_format}

        async def stream():
            try:
                while True:
                    try:
                        item = await next_event()
                    except APIError as error:
                        yield sse("error", error.body())
                        return
                    if item is None:
                        return
                    kind, payload = item
                    if kind == "error":
                        yield sse("error", failure(payload).body())
                        return
                    if kind == "progress":
                        step, steps, previews = payload
                        for index, data in previews:
                            yield sse(f"{event}.partial_image", {
                                "type": f"{event}.partial_image", **common, "b64_json": base64.b64encode(data).decode(),
                                "partial_image_index": step - 1, "image_index": index, "step": step, "num_steps": steps})
                    if kind == "images":
                        for index, seed, data in payload:
                            yield sse(f"{event}.completed", {
                                "type": f"{event}.completed", **common, "b64_json": base64.b64encode(data).decode(),
                                "image_index": index, "seed": seed})
                    if kind == "done":
                        return
            finally:  # the client left (Starlette cancels this generator) or the stream ended
                if job.finished < job.count:
                    worker.cancel(job)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def failure(error: Exception) -> APIError:
    """What the worker reports -> the HTTP answer: the pipeline's ValueErrors are the request's fault (400)."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, ValueError):
        return invalid(None, str(error))
    return APIError(500, f"generation failed: {type(error).__name__}: {error}", kind="server_error")


def sse(event: str, data: dict) -> str:
    """One server-sent event, as the OpenAI SDK parses them (an `event:` line, one `data:` line of JSON)."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


class _CountResponses:
    """ASGI middleware counting responses by route and status for /metrics. Pure ASGI (not BaseHTTPMiddleware), so
    that the handlers still see the client's disconnect."""

    def __init__(self, app, counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ("/", "/health", "/metrics", "/v1/models", "/v1/images/generations",
                                 "/v1/images/edits") else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counter.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
