"""Text to image with FLUX.1: `Pipeline` (load once, call many times) and `generate` (one call).

The pipeline is the official sampler spelled out: encode the prompt with T5 (per-token states) and CLIP
(one pooled vector), draw noise from the seed, pack it into 2×2-patch tokens, integrate the flow with Euler
steps over the schedule, unpack, and decode with the autoencoder. Given the same weights and seed it
produces what diffusers' `FluxPipeline` produces (tests/test_pipeline.py).
"""

import contextlib
import logging
import math
import numbers
import os
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from flux.weights import lora
from flux.weights.checkpoint import CheckpointError, read_json_object
from flux.modules.configs import SamplingDefaults, configs
from flux.weights.fp8 import load_fp8_flow_model
from flux.weights.loading import WEIGHTS_HELP, load_autoencoder, load_clip, load_flow_model, load_t5
from flux.runtime.offload import offload_blocks
from flux.pipelines.sampling import denoise, get_noise, get_schedule, image_ids, img2img_start, pack, text_ids, unpack

log = logging.getLogger("flux")

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_STEPS = 10_000
MAX_SEQUENCE_LENGTH = 512  # T5 tokens: FLUX.1-dev was trained with 512, and diffusers refuses more
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


class Pipeline:
    def __init__(self, *, model, ae, t5, clip, defaults: SamplingDefaults, device=None, offload=False, source=None,
                 release_text_encoders=False):
        """From loaded components. `device` None: where the transformer already is. `release_text_encoders`
        needs `source`, the folder they are read from again (see `from_pretrained`)."""
        if release_text_encoders and source is None:
            raise ValueError("release_text_encoders=True needs the folder to read the text encoders from again: "
                             "pass source=, or load with Pipeline.from_pretrained")
        _check_offload(offload)
        offload = "model" if offload is True else offload  # True, from before "blocks" existed
        self.model, self.ae, self.t5, self.clip = model, ae, t5, clip
        self.release_text_encoders = release_text_encoders
        self._text_encoder_dtype = next(clip.parameters()).dtype
        device = next(model.parameters()).device if device is None else device
        self.defaults, self.device, self.offload, self.source = defaults, torch.device(device), offload, source
        # The compute dtype, read off the first embedder: the blocks' weights may be stored in fp8 (flux.weights.fp8).
        self.dtype = model.img_in.weight.dtype
        if not offload:
            for module in (model, ae, t5, clip):
                module.to(self.device)
        if offload == "blocks":
            offload_blocks(model, device=self.device)

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype=torch.bfloat16, offload=False,
                        release_text_encoders=False, fp8=False) -> "Pipeline":
        """A pipeline from a FLUX.1 repository folder, or a repo id found in the Hugging Face cache.

        The defaults (steps, guidance, schedule shift, T5 length) follow from what is loaded: a guidance
        embedding means dev-style sampling, as do the repository's scheduler settings when present.
        `offload`: False keeps everything on `device`. "model" (or True) keeps the weights on the CPU, and each
        component visits `device` only while it runs. "blocks" also streams the transformer block by block
        (flux/runtime/offload.py): the device then holds its small parts and about two of its blocks.
        With `release_text_encoders`, T5 and CLIP are dropped once the prompts are encoded and read again from
        the files at the next call (memory-mapped: a fraction of a second when the files are in the page
        cache), so the peak memory holds the text encoders or the transformer, not both: for FLUX.1 in bf16,
        about 9.5 GB less.
        With `fp8`, the transformer's block weights are stored in float8_e4m3fn (about 12 GB for FLUX.1, from any
        file: fp8 ones as they are, others quantized as read) and upcast to `dtype` at each matmul (flux/weights/fp8.py).
        """
        _check_offload(offload)
        root = resolve_snapshot(path)
        device = torch.device(device) if device is not None else default_device()
        load_device = "cpu" if offload else device
        load_transformer = load_fp8_flow_model if fp8 else load_flow_model
        model = load_transformer(root, device=load_device, dtype=dtype)
        defaults = sampling_defaults(root, guidance_embed=model.params.guidance_embed)
        return cls(
            model=model,
            ae=load_autoencoder(root, device=load_device, dtype=dtype),
            t5=load_t5(root, max_length=defaults.max_sequence_length, device=load_device, dtype=dtype),
            clip=load_clip(root, device=load_device, dtype=dtype),
            defaults=defaults, device=device, offload=offload, source=root, release_text_encoders=release_text_encoders,
        )

    def load_lora(self, path, *, strength: float = 1.0) -> list[str]:
        """Adds a LoRA file (diffusers, kohya, Black Forest Labs, XLabs or OneTrainer keys) to the transformer,
        un-merged, at `strength`; returns the layers it changes. Several may be loaded; see `flux.weights.lora`."""
        return lora.load_lora(self.model, path, strength=strength)

    def unload_lora(self) -> None:
        """Removes every LoRA from the transformer, leaving its weights exactly as loaded."""
        lora.unload_lora(self.model)

    @torch.inference_mode()
    def __call__(
        self, prompt, *, width=None, height=None, num_steps=None, guidance=None, seed=None, num_images_per_prompt=1,
        image=None, strength=0.8, output_type="pil", progress=True, callback=None, negative_prompt=None,
        true_cfg_scale=1.0, max_sequence_length=None, t5_attention_mask=False,
    ):
        """Prompt(s) -> images: a list of PIL images by default (see `output_type`).

        `seed` an int draws the whole batch from one generator (as the official code and diffusers do);
        a list gives each image its own. `image` (PIL image(s) or a (B, 3, H, W) tensor in [0, 1]) with
        `strength` turns this into image-to-image. `callback(step, t, latents)` runs after every step.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
        width = self.defaults.image_size if width is None else width  # 1024 for the official models
        height = self.defaults.image_size if height is None else height
        num_steps = self.defaults.num_steps if num_steps is None else num_steps
        guidance = self._check_arguments(prompts, width, height, num_steps, guidance, num_images_per_prompt,
                                         strength, output_type, negative_prompt, true_cfg_scale, image,
                                         max_sequence_length, callback)
        max_sequence_length = max_sequence_length or self.defaults.max_sequence_length
        batch = len(prompts) * num_images_per_prompt
        if seed is None:
            seed = random.SystemRandom().randrange(2**63)
            log.info("seed %d", seed)
        seed, seeds = check_seeds(seed, batch)
        self._check_memory(batch, height, width, max_sequence_length, decode=output_type != "latent")

        # The text encoders run once per call, before the loop; the loop sees only their outputs.
        txt, vec, mask = self._encode(prompts, num_images_per_prompt, max_sequence_length, t5_attention_mask)
        negative = None
        if negative_prompt is not None and true_cfg_scale > 1:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            # The negative prompt is encoded like the prompt, its own padding mask included.
            negative = self._encode(negatives, num_images_per_prompt, max_sequence_length, t5_attention_mask)
        if self.release_text_encoders:
            # Their weights are views of memory maps: dropping the last reference unmaps them.
            self.t5 = self.clip = None

        noise = get_noise(batch, height, width, seed=seed, device=self.device)
        x = pack(noise)
        timesteps = get_schedule(num_steps, x.shape[1], shift=self.defaults.shift_schedule,
                                 base_shift=self.defaults.base_shift, max_shift=self.defaults.max_shift)
        if image is not None:
            x, timesteps = img2img_start(pack(self._encode_image(image, batch, width, height)), x, timesteps, strength)

        with self._on_device(self.model):
            bar = (lambda steps: tqdm(steps, desc="flux", unit="step")) if progress else None
            x = denoise(self.model, x, image_ids(batch, height, width, device=self.device), txt,
                        text_ids(batch, txt.shape[1], device=self.device), vec, timesteps, guidance=guidance,
                        txt_mask=mask, negative=negative, true_cfg_scale=true_cfg_scale, callback=callback,
                        progress=bar)
        latents = unpack(x, height, width)
        if output_type == "latent":
            return latents
        with self._on_device(self.ae):
            pixels = self.ae.decode(latents.to(self.dtype)).float()
        pixels = ((pixels + 1) / 2).clamp(0, 1)  # the decoder's [-1, 1] to [0, 1]
        if output_type == "pt":
            return pixels
        array = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        if output_type == "np":
            return array
        images = []
        for index, item in enumerate(array):
            picture = Image.fromarray((item * 255).round().astype(np.uint8))
            picture.info.update(prompt=prompts[index // num_images_per_prompt], seed=str(seeds[index]),
                                batch_index=str(index), steps=str(len(timesteps) - 1),
                                guidance=str(guidance), width=str(width), height=str(height))
            images.append(picture)
        return images

    def _check_arguments(self, prompts, width, height, num_steps, guidance, num_images_per_prompt, strength,
                         output_type, negative_prompt, true_cfg_scale, image, max_sequence_length, callback):
        """Every argument checked before any heavy work; returns the guidance to use."""
        check_request(prompts, width=width, height=height, num_steps=num_steps,
                      num_images_per_prompt=num_images_per_prompt, strength=strength, output_type=output_type,
                      negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale, image=image,
                      max_sequence_length=max_sequence_length)
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be a function (step, t, latents) or None, got {callback!r:.80}")
        if not self.model.params.guidance_embed:
            if guidance is not None:
                log.warning("this model has no guidance embedding (schnell-style); guidance=%s is ignored", guidance)
            return None
        guidance = self.defaults.guidance if guidance is None else guidance
        if not _is_number(guidance):
            raise ValueError(f"guidance must be a finite number, got {guidance!r:.80}")
        # The model embeds 1000·guidance in its own dtype (as the official code): 65.5 is fp16's limit.
        if 1000 * abs(guidance) > torch.finfo(self.dtype).max:
            raise ValueError(f"guidance {guidance} is too large for a {self.dtype} model (1000·guidance must stay "
                             f"below {torch.finfo(self.dtype).max:.0f}); FLUX.1-dev uses about 3.5")
        return float(guidance)

    def _check_memory(self, batch, height, width, text_tokens, *, decode):
        """Before anything is allocated: on the CPU, refuses a request whose activations would not fit in the free
        memory, where the kernel's OOM killer would end this process or another; elsewhere (a clean
        OutOfMemoryError) and above half of it, warns. `activation_bytes` errs high rather than low."""
        needed = activation_bytes(self.model.params, self.ae, batch=batch, height=height, width=width,
                                  text_tokens=text_tokens, itemsize=self.dtype.itemsize, decode=decode)
        free = free_memory(self.device)
        if free is None or needed <= free / 2:
            return
        message = (f"{batch} image(s) of {width}×{height} need about {needed / 2**30:.1f} GiB for activations, and "
                   f"{self.device} has {free / 2**30:.1f} GiB free")
        if needed > free and self.device.type == "cpu":
            raise ValueError(f"{message}; ask for fewer or smaller images"
                             + (", or output_type='latent' to skip decoding" if decode else ""))
        log.warning("%s; this may run out of memory", message)

    def _encode(self, prompts, repeats, max_sequence_length, t5_attention_mask):
        """Prompts -> T5 states (B, T, 4096), CLIP pooled (B, 768), and the T5 padding mask or None."""
        if self.t5 is None:  # released after the last call
            device = "cpu" if self.offload else self.device
            self.t5 = load_t5(self.source, max_length=self.defaults.max_sequence_length, device=device,
                              dtype=self._text_encoder_dtype)
            self.clip = load_clip(self.source, device=device, dtype=self._text_encoder_dtype)
        with self._on_device(self.t5):
            ids = self.t5.tokenize(prompts, max_length=max_sequence_length).to(self.device)
            mask = ids != self.t5.pad_token_id if t5_attention_mask else None
            txt = self.t5.encode(ids, attention_mask=mask)
        with self._on_device(self.clip):
            vec = self.clip(prompts)
        txt, vec = txt.to(self.dtype), vec.to(self.dtype)
        if mask is not None:
            mask = mask.repeat_interleave(repeats, dim=0)
        return txt.repeat_interleave(repeats, dim=0), vec.repeat_interleave(repeats, dim=0), mask

    def _encode_image(self, image, batch, width, height):
        """PIL image(s) or a (B, 3, H, W) tensor in [0, 1] -> (B, 16, H/8, W/8) latents (posterior mean)."""
        if isinstance(image, torch.Tensor):
            pixels = image.float()
            if pixels.ndim != 4 or pixels.shape[1] != 3:
                raise ValueError(f"image tensor must be (B, 3, H, W) in [0, 1], got shape {tuple(pixels.shape)}")
            if pixels.shape[-2:] != (height, width):
                pixels = torch.nn.functional.interpolate(pixels, size=(height, width), mode="bicubic", antialias=True)
        else:
            images = image if isinstance(image, (list, tuple)) else [image]
            pixels = torch.stack([torch.from_numpy(np.array(i.convert("RGB").resize((width, height), Image.LANCZOS))).permute(2, 0, 1)
                                  for i in images]).float() / 255  # (B, 3, H, W)
        pixels = pixels.expand(batch, -1, -1, -1) if pixels.shape[0] == 1 else pixels
        with self._on_device(self.ae):
            return self.ae.encode((pixels * 2 - 1).to(self.device, self.dtype)).float()

    @contextlib.contextmanager
    def _on_device(self, module):
        """With offload, `module` visits the device only while it runs, so peak memory is the largest component.
        With block offload the transformer is not moved here: its blocks visit the device by themselves."""
        if not self.offload or (self.offload == "blocks" and module is self.model):
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")


def check_request(prompts, *, width, height, num_steps, num_images_per_prompt=1, strength=0.8, output_type="pil",
                  negative_prompt=None, true_cfg_scale=1.0, image=None, max_sequence_length=None) -> None:
    """The checks that need no model: the `flux` command runs them before loading one. None (for width,
    height, num_steps, max_sequence_length) means the model's default, checked later. Booleans are not numbers
    here, though Python counts True as 1."""
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a non-empty list of strings")
    negatives = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
    if negatives is not None and not (isinstance(negatives, (list, tuple)) and all(isinstance(p, str) for p in negatives)):
        raise ValueError(f"negative_prompt must be a string or a list of strings, got {negative_prompt!r:.80}")
    for name, texts in (("prompt", prompts), ("negative_prompt", negatives or [])):
        for index, text in enumerate(texts):
            if any("\ud800" <= character <= "\udfff" for character in text):  # e.g. from undecodable bytes
                raise ValueError(f"{name} {index} is not valid Unicode: it holds a lone surrogate (\\ud800-\\udfff)")
    for name, size in (("width", width), ("height", height)):
        if size is None:
            continue
        if not _is_int(size) or size <= 0 or size % 16:
            nearest = max(16, 16 * round(size / 16)) if _is_number(size) else 1024
            raise ValueError(f"{name} must be a positive multiple of 16, got {size!r:.80}; the nearest valid size is {nearest}")
    if num_steps is not None and not (_is_int(num_steps) and 1 <= num_steps <= MAX_STEPS):
        raise ValueError(f"num_steps must be an integer ≥ 1 (and at most {MAX_STEPS}), got {num_steps!r:.80}")
    if not (_is_int(num_images_per_prompt) and num_images_per_prompt >= 1):
        raise ValueError(f"num_images_per_prompt must be an integer ≥ 1, got {num_images_per_prompt!r:.80}")
    if not (_is_number(strength) and 0 < strength <= 1):
        raise ValueError(f"strength must lie in (0, 1], got {strength!r:.80}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r:.80}")
    if not (_is_number(true_cfg_scale) and true_cfg_scale >= 1):
        raise ValueError(f"true_cfg_scale must be a finite number ≥ 1, got {true_cfg_scale!r:.80}")
    if max_sequence_length is not None and not (_is_int(max_sequence_length) and 1 < max_sequence_length <= MAX_SEQUENCE_LENGTH):
        raise ValueError(f"max_sequence_length must be an integer in [2, {MAX_SEQUENCE_LENGTH}], got {max_sequence_length!r:.80}")
    if negatives is not None and not isinstance(negative_prompt, str) and len(negatives) != len(prompts):
        raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
    if image is not None:
        count = image.shape[0] if isinstance(image, torch.Tensor) else len(image) if isinstance(image, (list, tuple)) else 1
        if count not in (1, len(prompts) * num_images_per_prompt):
            raise ValueError(f"got {count} images for {len(prompts)} prompt(s) × {num_images_per_prompt}; give one image, or one per output")


def check_seeds(seed, batch: int) -> tuple:
    """One seed, or one per image -> (the seed or list get_noise takes, the list of each image's seed)."""
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * batch
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for {batch} images; give one seed, or one per image")
    for value in seeds:
        if not (_is_int(value) and SEED_RANGE[0] <= value <= SEED_RANGE[1]):
            raise ValueError(f"a seed must be an integer in [-2**63, 2**64 - 1] (torch.Generator's range), "
                             f"got {value!r:.80}")
    seeds = [int(value) for value in seeds]
    return (seeds if isinstance(seed, (list, tuple)) else seeds[0]), seeds


def activation_bytes(params, ae, *, batch: int, height: int, width: int, text_tokens: int, itemsize: int,
                     decode: bool) -> int:
    """An estimate of the peak memory a generation needs beyond the weights, in bytes; meant to err high.

    Per sample, the largest of three stages (docs/hardening.md compares it with measurements):
      - the transformer, per token: four times a single-stream block's widest activation (q, k, v and the MLP
        input, 3·hidden + mlp_hidden values) in the model's dtype, and the fp32 copies RoPE makes of q and k;
        its attention adds no L² term, PyTorch's fused kernels run in O(L) memory;
      - the decoder's convolutions, per pixel decoded at once (the image, or one tile when it tiles): eight
        fp32 values per channel of its widest full-resolution layer (CPU kernels compute bf16 in fp32);
      - the decoder's mid-block attention: three (L, L) fp32 matrices over the latent pixels, since PyTorch
        takes its unfused path for the autoencoder's strided q, k, v;
    plus 40 bytes per output pixel (fp32 pixels, their copies, the 8-bit image).
    """
    tokens = math.ceil(height / 16) * math.ceil(width / 16) + text_tokens
    hidden = params.hidden_size
    transformer = tokens * (4 * (3 * hidden + params.mlp_hidden_dim) * itemsize + 8 * hidden * 4)
    if not decode:
        return batch * transformer
    pixels = height * width if height * width <= ae.tiling.auto_above else ae.tiling.size**2
    widest = ae.params.ch * ae.params.ch_mult[min(1, len(ae.params.ch_mult) - 1)]
    convolutions = 8 * pixels * widest * 4
    attention = 3 * (pixels // ae.params.downsampling**2) ** 2 * 4
    return batch * (max(transformer, convolutions, attention) + 40 * height * width)


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device`: CUDA's count (with what PyTorch holds unused), Linux's MemAvailable for the CPU;
    None where unknown."""
    if device.type == "cuda":
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + unused
    if device.type == "cpu" and os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


def _check_offload(offload) -> None:
    # `is` for the booleans: 0 and 1 are == False and True, and are refused like any other value.
    if not (offload is False or offload is True or (isinstance(offload, str) and offload in ("model", "blocks"))):
        raise ValueError(f"offload must be False, True, 'model' or 'blocks', got {offload!r:.80}")


def _is_number(value) -> bool:
    """A finite int or float (numpy's included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def sampling_defaults(root: Path, *, guidance_embed: bool) -> SamplingDefaults:
    """schnell's or dev's defaults, from the loaded model and the repository's scheduler settings."""
    defaults = configs["flux-dev" if guidance_embed else "flux-schnell"].sampling
    scheduler = root / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        settings = read_json_object(scheduler)
        defaults = replace(defaults, shift_schedule=settings.get("use_dynamic_shifting", defaults.shift_schedule),
                           base_shift=settings.get("base_shift", defaults.base_shift),
                           max_shift=settings.get("max_shift", defaults.max_shift))
        _check_defaults(scheduler, defaults)
    flux_settings = root / "flux_defaults.json"  # our own models state their sampling defaults here
    if flux_settings.is_file():
        try:
            defaults = replace(defaults, **read_json_object(flux_settings))
        except TypeError as error:  # a field SamplingDefaults does not have
            raise CheckpointError(f"{flux_settings}: not a valid defaults file: {error}") from None
        _check_defaults(flux_settings, defaults)
    return defaults


# What a defaults file may say, field by field. The shifts are logarithms (the schedule scales times by e^mu),
# FLUX's 0.5 and 1.15; the bound keeps out values (1e300, NaN) that break the schedule's exponential.
DEFAULTS_RANGES = {
    "num_steps": (lambda v: type(v) is int and 1 <= v <= MAX_STEPS, f"an integer in [1, {MAX_STEPS}]"),
    "guidance": (lambda v: v is None or _is_number(v), "a finite number, or null for a model without guidance"),
    "shift_schedule": (lambda v: type(v) is bool, "true or false"),
    "max_sequence_length": (lambda v: type(v) is int and 1 < v <= MAX_SEQUENCE_LENGTH,
                            f"an integer in [2, {MAX_SEQUENCE_LENGTH}]"),
    "base_shift": (lambda v: _is_number(v) and abs(v) <= 10, "a number in [-10, 10]"),
    "max_shift": (lambda v: _is_number(v) and abs(v) <= 10, "a number in [-10, 10]"),
    "image_size": (lambda v: type(v) is int and 0 < v <= 16384 and v % 16 == 0, "a positive multiple of 16, at most 16384"),
}


def _check_defaults(path: Path, defaults: SamplingDefaults) -> None:
    for name, (valid, expected) in DEFAULTS_RANGES.items():
        value = getattr(defaults, name)
        if not valid(value):
            raise CheckpointError(f"{path}: {name} = {value!r:.80} is not a valid sampling default (expected {expected})")


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_snapshot(path) -> Path:
    """A local folder as it is, or a repo id ("black-forest-labs/FLUX.1-schnell") from the Hugging Face cache.

    The cache lays a repository out as `models--{org}--{name}/snapshots/{revision}/`, with `refs/main`
    naming the revision; we read it without any network. Only when the files are not there and
    `huggingface_hub` is installed do we download, and then only the files we load.
    """
    local = Path(path).expanduser()
    if local.exists():
        return local
    repo_id = str(path)
    # "weights/FLUX.1-schnell" has a repo id's shape too: a first part that is a local folder marks a path.
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")) or local.parent.is_dir():
        raise CheckpointError(f"{path}: not found: no such folder, and not a repo id like 'black-forest-labs/FLUX.1-schnell' ({WEIGHTS_HELP})")
    cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub").expanduser()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{repo_id}: not in the Hugging Face cache ({repo}); download it first ({WEIGHTS_HELP}), "
            "or install huggingface_hub to let flux fetch it"
        ) from None
    # The official repositories hold the transformer and autoencoder twice (single files and diffusers folders):
    # fetch the single files and the rest, and the folders only for a repository that has no single files.
    patterns = ["flux1-*.safetensors", "ae.safetensors", "model_index.json", "scheduler/*", "text_encoder/*",
                "text_encoder_2/*", "tokenizer/*", "tokenizer_2/*"]
    log.warning("%s: not in the Hugging Face cache; downloading what flux loads into %s", repo_id, cache)
    snapshot = Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache))
    if not list(snapshot.glob("flux1-*.safetensors")) or not (snapshot / "ae.safetensors").is_file():
        snapshot = Path(snapshot_download(repo_id, allow_patterns=[*patterns, "transformer/*", "vae/*"], cache_dir=cache))
    return snapshot


_pipelines: dict = {}


def generate(prompt, *, model=None, **kwargs) -> list:
    """Prompt(s) -> list of PIL images, with a pipeline built once per model and kept for later calls.

    `model`: a FLUX.1 repository folder or a Hugging Face repo id; None uses the small built-in model.
    `device`, `dtype`, `offload`, `release_text_encoders` and `fp8` choose how it loads; every other keyword goes
    to `Pipeline.__call__`.
    """
    load_options = {key: kwargs.pop(key) for key in ("device", "dtype", "offload", "release_text_encoders", "fp8")
                    if key in kwargs}
    if model is None:
        model = builtin_model()
    key = (str(model), tuple(sorted((k, str(v)) for k, v in load_options.items())))
    if key not in _pipelines:
        _pipelines[key] = Pipeline.from_pretrained(model, **load_options)
    return _pipelines[key](prompt, **kwargs)


BUILTIN = Path(__file__).resolve().parent.parent / "weights" / "flux-tiny"


def builtin_model() -> Path:
    if not (BUILTIN / "model_index.json").is_file():
        raise CheckpointError(f"{BUILTIN}: the built-in model is missing; pass model= a FLUX.1 folder or repo id ({WEIGHTS_HELP})")
    log.warning("using the small built-in model (%s); pass model= for FLUX.1", BUILTIN)
    return BUILTIN
