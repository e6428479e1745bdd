"""`flux serve`: load a model once, then serve the OpenAI Images API on it (flux/serve/app.py) until stopped.

    flux serve [--model M] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-queue N] [--max-batch B]
               [--dtype ...] [--device ...] [--lora PATH[:SCALE]] [--request-timeout S]

The model loads before the server listens, so a bad path fails at once (exit 2) and a load balancer sees the
port open only when /health can answer 200. `--port 0` takes a free port; the log line "ready at URL" names it.
Without the `serve` extra installed it says which install command to run, and exits with 2.
"""

import argparse
import asyncio
import logging
import socket
import sys
from pathlib import Path

import torch

log = logging.getLogger("flux")
EXTRA = 'pip install "flux[serve]"'
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parser() -> argparse.ArgumentParser:
    serve = argparse.ArgumentParser(prog="flux serve", description="Serve a FLUX.1 model over the OpenAI Images API.")
    serve.add_argument("--model", help="FLUX.1 repository folder or Hugging Face repo id (default: the built-in tiny model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="0 takes a free port, named in the 'ready' line")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (/, /health, /metrics stay open)")
    serve.add_argument("--max-queue", type=positive, default=64, help="requests that may wait; more get 429")
    serve.add_argument("--max-batch", type=positive, default=4,
                       help="images generated together from waiting requests of the same size, steps and guidance")
    serve.add_argument("--request-timeout", type=float, default=None,
                       help="seconds a request may take, waiting included; past it, it stops and gets 504 (default: none)")
    serve.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                       help="compute dtype (default: bf16 on GPUs and on CPUs with bf16 instructions, else fp32)")
    serve.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    serve.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", type=lora_argument,
                       help="a LoRA file to load, at SCALE (default 1); repeat for several")
    return serve


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def lora_argument(text: str) -> tuple[Path, float]:
    """PATH or PATH:SCALE; a colon followed by something that is not a number belongs to the path."""
    path, colon, scale = text.rpartition(":")
    if colon:
        try:
            return Path(path), float(scale)
        except ValueError:
            pass
    return Path(text), 1.0


def main(argv=None) -> int:
    args = parser().parse_args(argv)  # exits with 2 on malformed arguments
    try:
        import fastapi, multipart, prometheus_client, uvicorn  # noqa: F401, E401 - the extra's packages
    except ImportError as error:
        print(f"flux serve: needs the serve extra ({error.name} is not installed): {EXTRA}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="flux: %(message)s")
    from flux.pipelines.pipeline import Pipeline
    from flux.pipelines.snapshots import builtin_model
    from flux.serve.app import create_app
    from flux.weights.checkpoint import CheckpointError

    if args.request_timeout is not None and not args.request_timeout > 0:
        print(f"flux serve: error: --request-timeout must be a positive number of seconds, got {args.request_timeout}",
              file=sys.stderr)
        return 2
    try:
        model = args.model if args.model is not None else builtin_model()
        pipe = Pipeline.from_pretrained(model, device=args.device, dtype=DTYPES.get(args.dtype))
        for path, scale in args.lora:
            pipe.load_lora(path, strength=scale)
            log.info("LoRA %s at %g", path, scale)
        listener = socket.create_server((args.host, args.port))
    except (ValueError, CheckpointError, OSError) as error:
        print(f"flux serve: error: {error}", file=sys.stderr)
        return 2
    app = create_app(pipe, model_id=model_id(model), model_name=str(model), api_key=args.api_key,
                     max_queue=args.max_queue, max_batch=args.max_batch, request_timeout=args.request_timeout)
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=10))
    host, port = listener.getsockname()[:2]
    asyncio.run(_serve(server, listener, f"http://{host if ':' not in host else f'[{host}]'}:{port}"))
    return 0


def model_id(model) -> str:
    """The name /v1/models lists: a repo id as given, a folder by its name."""
    local = Path(model)
    return local.name if local.exists() else str(model)


async def _serve(server, listener: socket.socket, url: str) -> None:
    """Run uvicorn on the bound socket; log the URL once it accepts connections."""
    task = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        log.info("ready at %s (the page at %s/, the API at %s/v1)", url, url, url)
    await task
