"""Text to image with FLUX.1: `Pipeline` (load once, call many times) and `generate` (one call).

The pipeline is the official sampler spelled out: encode the prompt with T5 (per-token states) and CLIP
(one pooled vector), draw noise from the seed, pack it into 2×2-patch tokens, integrate the flow with Euler
steps over the schedule, unpack, and decode with the autoencoder. Given the same weights and seed it
produces what diffusers' `FluxPipeline` produces (tests/test_pipeline.py).
"""

import contextlib
import json
import logging
import os
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from flux import lora
from flux.checkpoint import CheckpointError
from flux.configs import SamplingDefaults, configs
from flux.loading import WEIGHTS_HELP, load_autoencoder, load_clip, load_flow_model, load_t5
from flux.sampling import denoise, get_noise, get_schedule, image_ids, img2img_start, pack, text_ids, unpack

log = logging.getLogger("flux")

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class Pipeline:
    def __init__(self, *, model, ae, t5, clip, defaults: SamplingDefaults, device="cpu", offload=False, source=None):
        self.model, self.ae, self.t5, self.clip = model, ae, t5, clip
        self.defaults, self.device, self.offload, self.source = defaults, torch.device(device), offload, source
        self.dtype = next(model.parameters()).dtype
        if not offload:
            for module in (model, ae, t5, clip):
                module.to(self.device)

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype=torch.bfloat16, offload=False) -> "Pipeline":
        """A pipeline from a FLUX.1 repository folder, or a repo id found in the Hugging Face cache.

        The defaults (steps, guidance, schedule shift, T5 length) follow from what is loaded: a guidance
        embedding means dev-style sampling, as do the repository's scheduler settings when present.
        With `offload`, weights stay on the CPU and each component visits `device` only while it runs.
        """
        root = resolve_snapshot(path)
        device = torch.device(device) if device is not None else default_device()
        load_device = "cpu" if offload else device
        model = load_flow_model(root, device=load_device, dtype=dtype)
        defaults = sampling_defaults(root, guidance_embed=model.params.guidance_embed)
        return cls(
            model=model,
            ae=load_autoencoder(root, device=load_device, dtype=dtype),
            t5=load_t5(root, max_length=defaults.max_sequence_length, device=load_device, dtype=dtype),
            clip=load_clip(root, device=load_device, dtype=dtype),
            defaults=defaults, device=device, offload=offload, source=root,
        )

    def load_lora(self, path, *, strength: float = 1.0) -> list[str]:
        """Adds a LoRA file (diffusers, kohya, Black Forest Labs, XLabs or OneTrainer keys) to the transformer,
        un-merged, at `strength`; returns the layers it changes. Several may be loaded; see `flux.lora`."""
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
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        width = self.defaults.image_size if width is None else width  # 1024 for the official models
        height = self.defaults.image_size if height is None else height
        num_steps = self.defaults.num_steps if num_steps is None else num_steps
        guidance = self._check_arguments(prompts, width, height, num_steps, guidance, num_images_per_prompt,
                                         strength, output_type, negative_prompt, true_cfg_scale, image)
        max_sequence_length = max_sequence_length or self.defaults.max_sequence_length
        batch = len(prompts) * num_images_per_prompt
        if seed is None:
            seed = random.SystemRandom().randrange(2**63)
            log.info("seed %d", seed)
        seeds = [seed] * batch if isinstance(seed, int) else list(seed)
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for {batch} images; give one seed, or one per image")

        # The text encoders run once per call, before the loop; the loop sees only their outputs.
        txt, vec, mask = self._encode(prompts, num_images_per_prompt, max_sequence_length, t5_attention_mask)
        negative = None
        if negative_prompt is not None and true_cfg_scale > 1:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            negative_txt, negative_vec, _ = self._encode(negatives, num_images_per_prompt, max_sequence_length, False)
            negative = (negative_txt, negative_vec)

        noise = get_noise(batch, height, width, seed=seed if isinstance(seed, int) else seeds, device=self.device)
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
                         output_type, negative_prompt, true_cfg_scale, image):
        """Every argument checked before any heavy work; returns the guidance to use."""
        check_request(prompts, width=width, height=height, num_steps=num_steps,
                      num_images_per_prompt=num_images_per_prompt, strength=strength, output_type=output_type,
                      negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale, image=image)
        if not self.model.params.guidance_embed:
            if guidance is not None:
                log.warning("this model has no guidance embedding (schnell-style); guidance=%s is ignored", guidance)
            return None
        guidance = self.defaults.guidance if guidance is None else guidance
        if not (isinstance(guidance, (int, float)) and np.isfinite(guidance)):
            raise ValueError(f"guidance must be a finite number, got {guidance!r}")
        return float(guidance)

    def _encode(self, prompts, repeats, max_sequence_length, t5_attention_mask):
        """Prompts -> T5 states (B, T, 4096), CLIP pooled (B, 768), and the T5 padding mask or None."""
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
        """With offload, `module` visits the device only while it runs, so peak memory is the largest component."""
        if not self.offload:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")


def check_request(prompts, *, width, height, num_steps, num_images_per_prompt=1, strength=0.8, output_type="pil",
                  negative_prompt=None, true_cfg_scale=1.0, image=None) -> None:
    """The checks that need no model: the `flux` command runs them before loading one. None (for width,
    height, num_steps) means the model's default, checked later."""
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a non-empty list of strings")
    for name, size in (("width", width), ("height", height)):
        if size is None:
            continue
        if not isinstance(size, int) or size <= 0 or size % 16:
            nearest = max(16, 16 * round(size / 16)) if isinstance(size, (int, float)) and size == size else 1024
            raise ValueError(f"{name} must be a positive multiple of 16, got {size!r}; the nearest valid size is {nearest}")
    if num_steps is not None and (not isinstance(num_steps, int) or num_steps < 1):
        raise ValueError(f"num_steps must be an integer ≥ 1, got {num_steps!r}")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be an integer ≥ 1, got {num_images_per_prompt!r}")
    if not (isinstance(strength, (int, float)) and 0 < strength <= 1):
        raise ValueError(f"strength must lie in (0, 1], got {strength!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if not (isinstance(true_cfg_scale, (int, float)) and true_cfg_scale == true_cfg_scale and true_cfg_scale >= 1):
        raise ValueError(f"true_cfg_scale must be a number ≥ 1, got {true_cfg_scale!r}")
    if negative_prompt is not None and not isinstance(negative_prompt, str) and len(negative_prompt) != len(prompts):
        raise ValueError(f"got {len(negative_prompt)} negative prompts for {len(prompts)} prompts")
    if image is not None:
        count = image.shape[0] if isinstance(image, torch.Tensor) else len(image) if isinstance(image, (list, tuple)) else 1
        if count not in (1, len(prompts) * num_images_per_prompt):
            raise ValueError(f"got {count} images for {len(prompts)} prompt(s) × {num_images_per_prompt}; give one image, or one per output")


def sampling_defaults(root: Path, *, guidance_embed: bool) -> SamplingDefaults:
    """schnell's or dev's defaults, from the loaded model and the repository's scheduler settings."""
    defaults = configs["flux-dev" if guidance_embed else "flux-schnell"].sampling
    scheduler = root / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        try:
            settings = json.loads(scheduler.read_text(encoding="utf-8"))
            defaults = replace(defaults, shift_schedule=bool(settings.get("use_dynamic_shifting", defaults.shift_schedule)),
                               base_shift=float(settings.get("base_shift", defaults.base_shift)),
                               max_shift=float(settings.get("max_shift", defaults.max_shift)))
        except (ValueError, AttributeError, TypeError) as error:
            raise CheckpointError(f"{scheduler}: not a valid scheduler config: {error}") from None
    flux_settings = root / "flux_defaults.json"  # our own models state their sampling defaults here
    if flux_settings.is_file():
        try:
            defaults = replace(defaults, **json.loads(flux_settings.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"{flux_settings}: not a valid defaults file: {error}") from None
    return defaults


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
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")):
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
    `device`, `dtype` and `offload` choose how it loads; every other keyword goes to `Pipeline.__call__`.
    """
    load_options = {key: kwargs.pop(key) for key in ("device", "dtype", "offload") if key in kwargs}
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
