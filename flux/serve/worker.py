"""The one thread that owns the model: a bounded queue of jobs, micro-batches of compatible ones, cancellation at
step boundaries, and cheap previews for streams.

A `Pipeline` is not safe to call from two threads at once (its text encoders may be released and reloaded, a
LoRA may be loaded into it), and a GPU runs one batch at a time anyway. So every request becomes a `Job` that
waits in a queue; the worker takes the oldest, fills a batch of up to `max_batch` images with the images of the
jobs that wait for the same size, steps, guidance and conditioning, and makes one `Pipeline` call with a prompt
and a seed per image. Image-to-image and Fill jobs batch with one picture (and mask) per image; a Kontext call
shares its references over the whole batch, so Kontext jobs batch only with jobs whose references are the same
pictures, pixel for pixel (the same upload with different prompts or seeds). Nothing about one request lives in the pipeline between calls: the sampling state is
local to the call (diffusers #7851 is what happens otherwise).

Seeds: image i of a job with seed s has seed s + i (flux.pipelines.requests.image_seeds), as `flux generate
--num-images` seeds them. A job that has the batch to itself is run exactly as the command runs it (one
prompt, `num_images_per_prompt`), so its pixels are the command's; batched with others it differs only by the
rounding of batched kernels. A job with more than `max_batch` images is spread over several batches.

Cancellation: the pipeline's step callback checks, after every step, whether any job in the batch still
wants its images; when none does it raises `Cancelled`, which ends the call before the decoder runs. A job
cancelled while others in its batch go on is dropped when the batch ends.
"""

import hashlib
import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image, PngImagePlugin

from flux.pipelines.sampling import unpack

log = logging.getLogger("flux")


class QueueFull(Exception):
    """The queue holds `max_queue` jobs; `retry_after` is an estimate, in seconds, of when one leaves."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: its queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after


class Cancelled(Exception):
    """Raised from the step callback when no job in the batch wants its images any more."""


@dataclass(eq=False)
class Job:
    """One request: `count` images of one prompt, with the sampling settings every image of a batch shares.

    `notify(kind, payload)` is called from the worker thread: ("progress", (step, steps, previews)) where
    previews is a list of (image index, encoded bytes) or empty, ("images", [(index, seed, encoded bytes)]),
    ("done", None), ("error", exception). It must return at once (the server hands it to its event loop).
    """
    prompt: str
    seeds: list[int]
    width: int
    height: int
    steps: int
    notify: Callable[[str, object], None]
    guidance: float | None = None
    negative_prompt: str | None = None
    true_cfg_scale: float = 1.0
    image: Image.Image | None = None  # image-to-image from this picture, at `strength`; Fill's picture
    mask: Image.Image | None = None  # Fill: 255 where to repaint (flux.serve.fields.edit_area)
    references: list[Image.Image] | None = None  # Kontext's reference pictures
    strength: float | None = None  # image-to-image and Fill; None: none (generations, Kontext)
    auto_resize: bool | None = None  # Kontext: None is the pipeline's default (resize the references)
    output_format: str = "png"
    output_compression: int | None = None
    previews: int = 0  # how many previews to send over the steps (0: none)
    model_name: str = ""  # written into each PNG, as `flux generate` writes its --model
    cancelled: threading.Event = field(default_factory=threading.Event)
    scheduled: int = 0  # images handed to a batch so far
    finished: int = 0  # images delivered
    references_key: str | None = field(default=None, init=False)  # a digest of the references' pixels

    def __post_init__(self):
        if self.references is not None:
            digest = hashlib.sha256()
            for picture in self.references:
                digest.update(f"{picture.mode} {picture.size};".encode())
                digest.update(picture.tobytes())
            self.references_key = digest.hexdigest()

    @property
    def count(self) -> int:
        return len(self.seeds)

    def batch_key(self) -> tuple:
        """Jobs with equal keys can share a batch: the pipeline takes one size, schedule and guidance per call."""
        # Without true CFG the negative prompt is unused; with it, every image of a batch needs one.
        negative = self.negative_prompt is not None and self.true_cfg_scale > 1
        # Pictures and masks go one per image; Kontext's references are one set per call (see the module docstring).
        return (self.width, self.height, self.steps, self.guidance, self.true_cfg_scale if negative else 1.0,
                negative, self.image is not None, self.mask is not None, self.strength, self.references_key,
                self.auto_resize)

    def steps_run(self) -> int:
        """The steps the sampler takes: image-to-image (and Fill below strength 1) skips the first
        int((1 − strength)·steps), as flux.pipelines.sampling.img2img_start does."""
        if self.image is None or self.strength is None:
            return self.steps
        return self.steps - int((1 - self.strength) * self.steps)


@dataclass
class Slice:
    """Images start .. start + count − 1 of a job, within one batch."""
    job: Job
    start: int
    count: int


class Worker:
    """Owns `pipe`; `submit` queues a job (or raises QueueFull), `cancel` withdraws one, `stop` ends the thread."""

    def __init__(self, pipe, *, max_queue: int = 64, max_batch: int = 4,
                 on_batch: Callable[[int, float], None] | None = None):
        if max_queue < 1 or max_batch < 1:
            raise ValueError(f"max_queue and max_batch must be ≥ 1, got {max_queue} and {max_batch}")
        self.pipe, self.max_queue, self.max_batch = pipe, max_queue, max_batch
        self.on_batch = on_batch  # (images, seconds per image), after each batch that ran to its end
        self.waiting: list[Job] = []  # in arrival order; a job stays here until all its images are scheduled
        self.condition = threading.Condition()
        self.stopping = False
        self.seconds_per_image = None  # a running average, for Retry-After
        self.running: list[Slice] = []  # the batch being made
        self.thread = threading.Thread(target=self._run, name="flux-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.condition:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(self.retry_after())
            self.waiting.append(job)
            self.condition.notify()

    def cancel(self, job: Job) -> None:
        """The client left or its time ran out: a waiting job leaves the queue, a running one stops at the next
        step boundary (or, batched with others that go on, is dropped when the batch ends)."""
        job.cancelled.set()
        with self.condition:
            if job in self.waiting:
                self.waiting.remove(job)

    def queue_length(self) -> int:
        with self.condition:
            return len(self.waiting)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def retry_after(self) -> int:
        """Seconds until the queue has room again, about: the images ahead of a new job, batched."""
        images = sum(job.count - job.scheduled for job in self.waiting)
        per_image = self.seconds_per_image or 1.0
        return max(1, round(per_image * images / self.max_batch))

    def stop(self, timeout: float = 10) -> None:
        with self.condition:
            self.stopping = True
            for job in [*self.waiting, *(part.job for part in self.running)]:
                job.cancelled.set()  # a running batch stops at its next step
            self.waiting.clear()
            self.condition.notify()
        self.thread.join(timeout)

    # The worker thread

    def _run(self) -> None:
        while True:
            with self.condition:
                while not self.waiting and not self.stopping:
                    self.condition.wait()
                if self.stopping:
                    return
                batch = self.running = self._take_batch()
            if batch:
                self._run_batch(batch)
            self.running = []

    def _take_batch(self) -> list[Slice]:
        """The oldest job's next images, then those of later jobs with the same batch key, up to max_batch."""
        self.waiting = [job for job in self.waiting if not job.cancelled.is_set()]
        if not self.waiting:
            return []
        key, room, batch = self.waiting[0].batch_key(), self.max_batch, []
        for job in list(self.waiting):
            if room == 0:
                break
            if job.batch_key() != key:
                continue
            count = min(room, job.count - job.scheduled)
            batch.append(Slice(job, job.scheduled, count))
            job.scheduled += count
            room -= count
            if job.scheduled == job.count:
                self.waiting.remove(job)
        return batch

    def _run_batch(self, batch: list[Slice]) -> None:
        first = batch[0].job
        images = sum(part.count for part in batch)
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                pictures = self._call_pipeline(batch)
        except Cancelled:
            log.info("batch of %d image(s) stopped: every request in it was cancelled", images)
            return
        except ValueError as error:  # what the pipeline refuses (memory, guidance range): the request's fault
            self._fail(batch, error)
            return
        except Exception as error:  # noqa: BLE001 - a bug or the device failing; the worker must survive it
            log.exception("generation failed (%s)", first.prompt[:60])
            self._fail(batch, error)
            return
        seconds = (time.perf_counter() - started) / images
        self.seconds_per_image = seconds if self.seconds_per_image is None else 0.8 * self.seconds_per_image + 0.2 * seconds
        if self.on_batch is not None:
            self.on_batch(images, seconds)
        offset = 0
        for part in batch:
            own = pictures[offset : offset + part.count]
            offset += part.count
            if part.job.cancelled.is_set():
                continue
            encoded = [(part.start + i, part.job.seeds[part.start + i], encode(picture, part.job, part.start + i))
                       for i, picture in enumerate(own)]
            part.job.finished += part.count
            part.job.notify("images", encoded)
            if part.job.finished == part.job.count:
                part.job.notify("done", None)

    def _fail(self, batch: list[Slice], error: Exception) -> None:
        for job in {part.job for part in batch}:
            self.cancel(job)  # its other images, if any wait, are not made
            job.notify("error", error)

    def _call_pipeline(self, batch: list[Slice]) -> list:
        first = batch[0].job
        steps_run = first.steps_run()
        preview_steps = {slice_.job: preview_schedule(slice_.job.previews, steps_run) for slice_ in batch}

        def callback(step, t, latents):
            """After each step: stop when nobody waits for this batch; report progress and previews."""
            if all(part.job.cancelled.is_set() for part in batch):
                raise Cancelled
            offset = 0
            for part in batch:
                previews = []
                if step + 1 in preview_steps[part.job]:
                    rows = latents[offset : offset + part.count]
                    previews = [(part.start + i, preview) for i, preview in
                                enumerate(preview_images(rows, part.job))]
                if not part.job.cancelled.is_set():
                    part.job.notify("progress", (step + 1, steps_run, previews))
                offset += part.count

        settings = dict(width=first.width, height=first.height, num_steps=first.steps, guidance=first.guidance,
                        true_cfg_scale=first.true_cfg_scale, strength=first.strength, auto_resize=first.auto_resize,
                        progress=False, callback=callback)
        if len(batch) == 1 and batch[0].count == first.count:
            # Alone, the job runs exactly as `flux generate --num-images` runs it: one prompt encoded once.
            return self.pipe(first.prompt, seed=list(first.seeds), num_images_per_prompt=first.count,
                             negative_prompt=first.negative_prompt, image=first.references or first.image,
                             mask_image=first.mask, **settings)
        prompts, seeds, negatives, images, masks = [], [], [], [], []
        for part in batch:
            prompts += [part.job.prompt] * part.count
            seeds += part.job.seeds[part.start : part.start + part.count]
            negatives += [part.job.negative_prompt] * part.count
            images += [part.job.image] * part.count
            masks += [part.job.mask] * part.count
        # Equal batch keys: every job has a picture and a mask, or none does; the references are the same.
        image = first.references or (None if first.image is None else images)
        return self.pipe(prompts, seed=seeds, negative_prompt=None if negatives[0] is None else negatives,
                         image=image, mask_image=None if first.mask is None else masks, **settings)


def preview_schedule(previews: int, steps: int) -> set[int]:
    """The steps (1-based) after which a job asking for `previews` previews gets one, spread evenly, the last one
    before the final step (whose image is the result itself)."""
    if previews <= 0 or steps <= 1:
        return set()
    return {max(1, round(steps * (k + 1) / (previews + 1))) for k in range(previews)} - {steps}


def preview_images(latents: torch.Tensor, job: Job) -> list[bytes]:
    """(B, N, 64) packed latents -> B encoded images: the first three latent channels, each stretched to [0, 255],
    resized to the job's size. No decoder run: a glimpse of the layout and colour masses, at almost no cost."""
    channels = unpack(latents.float(), job.height, job.width)[:, :3]  # (B, 3, H/8, W/8)
    low = channels.amin(dim=(2, 3), keepdim=True)
    high = channels.amax(dim=(2, 3), keepdim=True)
    pixels = ((channels - low) / (high - low).clamp_min(1e-6) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [encode(Image.fromarray(item).resize((job.width, job.height), Image.BILINEAR), job, None) for item in pixels]


def encode(picture: Image.Image, job: Job, index: int | None) -> bytes:
    """A PIL image -> bytes in the job's format. PNGs carry what `flux generate` writes: the pipeline's image.info
    (prompt, seed, steps, guidance, size), the image's index within the request, and the model."""
    buffer = io.BytesIO()
    if job.output_format == "png":
        metadata = None
        if index is not None:
            metadata = PngImagePlugin.PngInfo()
            info = {**picture.info, "batch_index": str(index), "model": job.model_name}
            for key, value in info.items():
                metadata.add_text(key, str(value))
        picture.save(buffer, format="PNG", pnginfo=metadata)
    else:
        quality = 90 if job.output_compression is None else job.output_compression
        picture.save(buffer, format="JPEG" if job.output_format == "jpeg" else "WEBP", quality=quality)
    return buffer.getvalue()

