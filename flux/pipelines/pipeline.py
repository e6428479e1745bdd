"""Text to image with FLUX.1: `Pipeline` (load once, call many times) and `generate` (one call).

The pipeline is the official sampler spelled out: encode the prompt with T5 (per-token states) and CLIP
(one pooled vector), draw noise from the seed, pack it into 2×2-patch tokens, integrate the flow with Euler
steps over the schedule, unpack, and decode with the autoencoder. Given the same weights and seed it
produces what diffusers' `FluxPipeline` produces (tests/test_pipeline.py).
"""

import contextlib
import logging
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from flux.modules.configs import SamplingDefaults
from flux.pipelines.devices import default_device, default_dtype, free_memory
from flux.pipelines.redux import check_text_inputs
from flux.pipelines.requests import activation_bytes, check_request, check_seeds, is_number
from flux.pipelines.sampling import denoise, get_noise, get_schedule, image_ids, img2img_start, pack, text_ids, unpack
from flux.pipelines.snapshots import builtin_model, resolve_snapshot, sampling_defaults
from flux.runtime.cache import check_cache, first_block_cache
from flux.pipelines import variants
from flux.runtime.offload import offload_blocks
from flux.weights import lora
from flux.weights.fp8 import load_fp8_flow_model
from flux.weights.int8 import quantize_int8
from flux.weights.loading import is_gguf, load_autoencoder, load_clip, load_flow_model, load_t5
from flux.weights.pages import pages_supported, release_pages

log = logging.getLogger("flux")


class Pipeline:
    def __init__(self, *, model, ae, t5, clip, defaults: SamplingDefaults, device=None, offload=False, source=None,
                 release_text_encoders=False, variant=None, release_pages=False):
        """From loaded components. `device` None: where the transformer already is. `release_text_encoders`
        needs `source`, the folder they are read from again (see `from_pretrained`). `variant` None reads it
        off the transformer; "kontext" must be said (its shapes are dev's). `release_pages`: see `from_pretrained`."""
        if release_text_encoders and source is None:
            raise ValueError("release_text_encoders=True needs the folder to read the text encoders from again: "
                             "pass source=, or load with Pipeline.from_pretrained")
        _check_offload(offload)
        self._kontext = variants.check_variant(variant, model, kontext=False, source="the transformer") == "kontext"
        offload = "model" if offload is True else offload  # True, from before "blocks" existed
        self.model, self.ae, self.t5, self.clip = model, ae, t5, clip
        self.release_text_encoders = release_text_encoders
        _check_release_pages(release_pages)
        if release_pages and not pages_supported():
            log.info("release_pages: this system cannot release mapped pages (Linux only); the weights stay mapped")
        self.release_pages = release_pages
        if release_pages:
            # After each block, its pages go back to the page cache: the process holds about one block at a time.
            for block in (*model.double_blocks, *model.single_blocks):
                block.register_forward_hook(_release_module_pages)
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
    def from_pretrained(cls, path, *, device=None, dtype=None, offload=False,
                        release_text_encoders=False, fp8=False, quantize=None, variant=None, transformer=None,
                        release_pages=False) -> "Pipeline":
        """A pipeline from a FLUX.1 repository folder, or a repo id found in the Hugging Face cache.

        `dtype` None computes in what is fast on `device` (flux/pipelines/devices.py): bf16 on GPUs and on CPUs
        with bf16 instructions, fp32 on CPUs without them.
        The defaults (steps, guidance, schedule shift, T5 length) follow from what is loaded: a guidance
        embedding means dev-style sampling, as do the repository's scheduler settings when present.
        `offload`: False keeps everything on `device`. "model" (or True) keeps the weights on the CPU, and each
        component visits `device` only while it runs. "blocks" also streams the transformer block by block
        (flux/runtime/offload.py): the device then holds its small parts and about two of its blocks.
        With `release_text_encoders`, T5 and CLIP are dropped once the prompts are encoded and read again from
        the files at the next call (memory-mapped: a fraction of a second when the files are in the page
        cache), so the peak memory holds the text encoders or the transformer, not both: for FLUX.1 in bf16,
        about 9.5 GB less.
        With `release_pages`, the weights that are views of their memory-mapped files (those loaded in their stored
        dtype) give their pages back to the page cache after each use: every transformer block after it runs, the
        text encoders after encoding (flux/weights/pages.py). The process then holds about one block of the
        transformer at a time instead of all of it; the next use maps the pages again from the cache, without
        disk I/O while memory is free, at a cost of about 3 % of a step (benchmarks/README.md).
        With `fp8`, the transformer's block weights are stored in float8_e4m3fn (about 12 GB for FLUX.1, from any
        file: fp8 ones as they are, others quantized as read) and upcast to `dtype` at each matmul (flux/weights/fp8.py).
        `quantize="int8"` makes the blocks' attention and MLP Linears compute in int8 (W8A8, flux/weights/int8.py):
        about half the transformer's memory, and faster products on hardware with int8 dot products.
        `variant` (flux/pipelines/variants.py) None reads it off the checkpoint: "fill", "control", "kontext" or
        "text-to-image"; one that contradicts the checkpoint is a ValueError. The family's defaults follow it.
        `transformer`: one transformer file to use instead of the folder's, e.g. a `.gguf` (kept quantized,
        flux/weights/gguf.py) or a community fp8 file; everything else comes from `path`.
        """
        _check_offload(offload)
        _check_release_pages(release_pages)  # before the load: a typo should not cost a 24 GB read
        if quantize not in (None, "int8") or (quantize and fp8):
            raise ValueError(f"quantize must be None or 'int8' (and not combined with fp8=True), got {quantize!r:.80}")
        root = resolve_snapshot(path)
        device = torch.device(device) if device is not None else default_device()
        dtype = default_dtype(device) if dtype is None else dtype
        load_device = "cpu" if offload else device
        if (fp8 or quantize) and transformer is not None and is_gguf(Path(transformer)):
            raise ValueError(f"transformer={transformer}: a GGUF file keeps its own quantization; drop fp8/quantize")
        load_transformer = load_fp8_flow_model if fp8 else load_flow_model
        model = load_transformer(root if transformer is None else Path(transformer), device=load_device, dtype=dtype)
        if quantize == "int8":
            quantize_int8(model)
        variant = variants.check_variant(variant, model, kontext=variants.is_kontext_checkpoint(root), source=root)
        names = " ".join([str(root), *(p.name for p in root.glob("*.safetensors"))])
        preset = variants.family_preset(variant, names) if model.params.guidance_embed else None
        defaults = sampling_defaults(root, guidance_embed=model.params.guidance_embed, preset=preset)
        return cls(
            model=model,
            ae=load_autoencoder(root, device=load_device, dtype=dtype),
            t5=load_t5(root, max_length=defaults.max_sequence_length, device=load_device, dtype=dtype),
            clip=load_clip(root, device=load_device, dtype=dtype),
            defaults=defaults, device=device, offload=offload, source=root, release_text_encoders=release_text_encoders,
            variant=variant, release_pages=release_pages,
        )

    @property
    def variant(self) -> str:
        """"text-to-image", "fill", "control" or "kontext": what the transformer takes now (a control LoRA
        makes a text-to-image model a control one, flux.weights.lora)."""
        return variants.infer_variant(self.model, kontext=self._kontext)

    def load_lora(self, path, *, strength: float = 1.0) -> list[str]:
        """Adds a LoRA file (diffusers, kohya, Black Forest Labs, XLabs or OneTrainer keys) to the transformer,
        un-merged, at `strength`; returns the layers it changes. Several may be loaded; see `flux.weights.lora`.
        A control LoRA (flux1-canny-dev-lora) widens img_in: `variant` is then "control"."""
        return lora.load_lora(self.model, path, strength=strength)

    def unload_lora(self) -> None:
        """Removes every LoRA from the transformer, leaving its weights exactly as loaded."""
        lora.unload_lora(self.model)

    @torch.inference_mode()
    def __call__(
        self, prompt=None, *, width=None, height=None, num_steps=None, guidance=None, seed=None, num_images_per_prompt=1,
        image=None, strength=None, output_type="pil", progress=True, callback=None, negative_prompt=None,
        true_cfg_scale=1.0, max_sequence_length=None, t5_attention_mask=False, prompt_embeds=None,
        pooled_prompt_embeds=None, redux_image=None, redux=None, prompt_embeds_scale=1.0, pooled_prompt_embeds_scale=1.0,
        cache=None, cache_threshold=0.08, mask_image=None, control_image=None, auto_resize=None,
    ):
        """Prompt(s) -> images: a list of PIL images by default (see `output_type`).

        `seed` an int draws the whole batch from one generator (as the official code and diffusers do);
        a list gives each image its own. `image` (PIL image(s), numpy arrays or tensors in [0, 1]) with
        `strength` (default 0.8) turns a text-to-image model into image-to-image. `callback(step, t, latents)`
        runs after every step.
        `prompt_embeds` (B, T, 4096) and `pooled_prompt_embeds` (B, 768), e.g. from `encode_prompt`, replace
        `prompt`. `redux_image` with `redux` (`flux.load_redux`) appends FLUX.1 Redux's image tokens to the
        prompt's, `prompt_embeds_scale` and `pooled_prompt_embeds_scale` scale the text conditioning
        (flux/pipelines/redux.py, docs/redux.md).
        `cache="first-block"` skips the transformer's later blocks at steps whose first block changed by less than
        `cache_threshold` (relative) since the last full step: for many-step sampling (flux/runtime/cache.py).
        The family's images (flux/pipelines/variants.py, docs/family.md): Fill `image` and `mask_image` (white
        repainted; `strength` default 1), Canny/Depth `control_image`, Kontext `image` one reference or a list
        (`auto_resize` True: to the nearest trained resolution); without width and height, their output has
        the size of the (first) condition image.
        """
        prompts, text = check_text_inputs(
            prompt, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds, redux_image=redux_image,
            redux=redux, prompt_embeds_scale=prompt_embeds_scale, pooled_prompt_embeds_scale=pooled_prompt_embeds_scale,
            t5_attention_mask=t5_attention_mask, params=self.model.params)
        num_steps = self.defaults.num_steps if num_steps is None else num_steps
        # Without a prompt, the checks count the embeddings' rows or the Redux images' groups as the prompts.
        counted = [""] * text.count if prompts is None else prompts
        guidance = self._check_arguments(counted, width, height, num_steps, guidance, num_images_per_prompt,
                                         strength, output_type, negative_prompt, true_cfg_scale,
                                         max_sequence_length, callback)
        max_sequence_length = max_sequence_length or self.defaults.max_sequence_length
        batch = text.count * num_images_per_prompt
        request = variants.check_images(self.variant, image=image, mask_image=mask_image, control_image=control_image,
                                        auto_resize=auto_resize, strength=strength, prompts=text.count,
                                        per_prompt=num_images_per_prompt)
        # 1024 for the official models, unless a condition image gives the size
        width, height = variants.output_size(request, width, height, default=self.defaults.image_size)
        if seed is None:
            seed = random.SystemRandom().randrange(2**63)
            log.info("seed %d", seed)
        seed, seeds = check_seeds(seed, batch)
        check_cache(cache, cache_threshold)
        if cache is not None and negative_prompt is not None and true_cfg_scale > 1:
            raise ValueError("cache= does not combine with true classifier-free guidance (negative_prompt with "
                             "true_cfg_scale > 1): its two predictions per step would share one cache")
        text_tokens = (max_sequence_length if prompt_embeds is None else prompt_embeds.shape[1]) + text.redux_tokens
        self._check_memory(batch, height, width, text_tokens + variants.reference_tokens(request),
                           decode=output_type != "latent")

        # The text encoders run once per call, before the loop; the loop sees only their outputs.
        txt, vec, mask = self._text_conditioning(prompts, text, num_images_per_prompt, max_sequence_length,
                                                 t5_attention_mask)
        negative = None
        if negative_prompt is not None and true_cfg_scale > 1:
            negatives = [negative_prompt] * text.count if isinstance(negative_prompt, str) else list(negative_prompt)
            # The negative prompt is encoded like the prompt, its own padding mask included.
            negative = self._encode(negatives, num_images_per_prompt, max_sequence_length, t5_attention_mask)
        if self.release_text_encoders:
            # Their weights are views of memory maps: dropping the last reference unmaps them.
            self.t5 = self.clip = None

        noise = get_noise(batch, height, width, seed=seed, device=self.device)
        x = pack(noise)
        timesteps = get_schedule(num_steps, x.shape[1], shift=self.defaults.shift_schedule,
                                 base_shift=self.defaults.base_shift, max_shift=self.defaults.max_shift)
        condition, start = variants.prepare(request, encode=self._encode_pixels, batch=batch, width=width, height=height)
        if start is not None:
            x, timesteps = img2img_start(start, x, timesteps, request.strength)

        caching = first_block_cache(self.model, threshold=cache_threshold) if cache else contextlib.nullcontext()
        with self._on_device(self.model), caching as cached:
            bar = (lambda steps: tqdm(steps, desc="flux", unit="step")) if progress else None
            x = denoise(self.model, x, image_ids(batch, height, width, device=self.device), txt,
                        text_ids(batch, txt.shape[1], device=self.device), vec, timesteps, guidance=guidance,
                        txt_mask=mask, negative=negative, true_cfg_scale=true_cfg_scale, callback=callback,
                        progress=bar, condition=condition)
        if cached is not None:
            log.info("first-block cache: %d of %d steps reused the other blocks", cached.skipped, len(cached.steps))
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
            picture.info.update(prompt=prompts[index // num_images_per_prompt] if prompts else "", seed=str(seeds[index]),
                                batch_index=str(index), steps=str(len(timesteps) - 1),
                                guidance=str(guidance), width=str(width), height=str(height))
            images.append(picture)
        return images

    def _check_arguments(self, prompts, width, height, num_steps, guidance, num_images_per_prompt, strength,
                         output_type, negative_prompt, true_cfg_scale, max_sequence_length, callback):
        """Every argument but the images (variants.check_images) checked before any heavy work; returns the
        guidance to use."""
        check_request(prompts, width=width, height=height, num_steps=num_steps,
                      num_images_per_prompt=num_images_per_prompt, strength=strength, output_type=output_type,
                      negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale,
                      max_sequence_length=max_sequence_length)
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be a function (step, t, latents) or None, got {callback!r:.80}")
        if not self.model.params.guidance_embed:
            if guidance is not None:
                log.warning("this model has no guidance embedding (schnell-style); guidance=%s is ignored", guidance)
            return None
        guidance = self.defaults.guidance if guidance is None else guidance
        if not is_number(guidance):
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

    @torch.no_grad()
    def encode_prompt(self, prompt, *, max_sequence_length=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt(s) -> (prompt_embeds (B, T, 4096), pooled_prompt_embeds (B, 768)): T5's and CLIP's outputs in the
        pipeline's dtype, as `__call__` computes them; pass them back as `prompt_embeds=`, `pooled_prompt_embeds=`."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
        check_request(prompts, width=None, height=None, num_steps=None, max_sequence_length=max_sequence_length)
        txt, vec, _ = self._encode(prompts, 1, max_sequence_length or self.defaults.max_sequence_length, False)
        if self.release_text_encoders:
            self.t5 = self.clip = None
        return txt, vec

    def _text_conditioning(self, prompts, text, repeats, max_sequence_length, t5_attention_mask):
        """The transformer's text inputs (txt, vec, T5 mask or None) from the prompts, the given embeddings, or
        zeros (Redux without a prompt, as diffusers' FluxPriorReduxPipeline without text encoders); Redux tokens
        appended and scales applied by `text.condition` (flux/pipelines/redux.py)."""
        params = self.model.params
        if prompts is not None:
            txt, vec, mask = self._encode(prompts, 1, max_sequence_length, t5_attention_mask)
        elif text.prompt_embeds is not None:
            txt = text.prompt_embeds.to(self.device, self.dtype)
            vec, mask = text.pooled_prompt_embeds.to(self.device, self.dtype), None
        else:
            txt = torch.zeros(text.count, max_sequence_length, params.context_in_dim, device=self.device, dtype=self.dtype)
            vec, mask = torch.zeros(text.count, params.vec_in_dim, device=self.device, dtype=self.dtype), None
        txt, vec, mask = text.condition(txt, vec, mask)
        mask = None if mask is None else mask.repeat_interleave(repeats, dim=0)
        return txt.repeat_interleave(repeats, dim=0), vec.repeat_interleave(repeats, dim=0), mask

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
        if self.release_pages:
            _release_module_pages(self.t5)
            _release_module_pages(self.clip)
        if mask is not None:
            mask = mask.repeat_interleave(repeats, dim=0)
        return txt.repeat_interleave(repeats, dim=0), vec.repeat_interleave(repeats, dim=0), mask

    def _encode_pixels(self, images):
        """(B, 3, H, W) images in [-1, 1] -> (B, 16, H/8, W/8) fp32 latents, the posterior mean."""
        with self._on_device(self.ae):
            return self.ae.encode(images.to(self.device, self.dtype)).float()

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


def _release_module_pages(module, *hook_arguments) -> None:
    """release_pages for a module's parameters and buffers; also a forward hook (whose arguments it ignores)."""
    release_pages([*module.parameters(), *module.buffers()])


def _check_release_pages(release_pages) -> None:
    if release_pages is not True and release_pages is not False:
        raise ValueError(f"release_pages must be True or False, got {release_pages!r:.80}")


def _check_offload(offload) -> None:
    # `is` for the booleans: 0 and 1 are == False and True, and are refused like any other value.
    if not (offload is False or offload is True or (isinstance(offload, str) and offload in ("model", "blocks"))):
        raise ValueError(f"offload must be False, True, 'model' or 'blocks', got {offload!r:.80}")


_pipelines: dict = {}


def generate(prompt, *, model=None, **kwargs) -> list:
    """Prompt(s) -> list of PIL images, with a pipeline built once per model and kept for later calls.

    `model`: a FLUX.1 repository folder or a Hugging Face repo id; None uses the small built-in model.
    `device`, `dtype`, `offload`, `release_text_encoders`, `release_pages`, `fp8`, `quantize` and `variant` choose
    how it loads;
    every other keyword (the family's `image`, `mask_image`, `control_image`, `auto_resize` among them) goes to
    `Pipeline.__call__`.
    """
    load_options = {key: kwargs.pop(key) for key in ("device", "dtype", "offload", "release_text_encoders", "fp8", "quantize",
                                                     "variant", "release_pages")
                    if key in kwargs}
    if model is None:
        model = builtin_model()
    key = (str(model), tuple(sorted((k, str(v)) for k, v in load_options.items())))
    if key not in _pipelines:
        _pipelines[key] = Pipeline.from_pretrained(model, **load_options)
    return _pipelines[key](prompt, **kwargs)
