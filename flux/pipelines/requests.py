"""Checking a generation request before any heavy work, and estimating the memory it needs.

Shared by `Pipeline`, the `flux` command and the server, so a bad size or seed is refused with the same message
wherever it comes from, before a 30 GB read or a minute of sampling.
"""

import math
import numbers
import random

import torch

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_STEPS = 10_000
MAX_SEQUENCE_LENGTH = 512  # T5 tokens: FLUX.1-dev was trained with 512, and diffusers refuses more
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def check_request(prompts, *, width, height, num_steps, num_images_per_prompt=1, strength=None, output_type="pil",
                  negative_prompt=None, true_cfg_scale=1.0, image=None, max_sequence_length=None) -> None:
    """The checks that need no model: the `flux` command runs them before loading one. None (for width,
    height, num_steps, max_sequence_length) means the model's default, checked later. Booleans are not numbers
    here, though Python counts True as 1."""
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
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
        if not is_int(size) or size <= 0 or size % 16:
            nearest = max(16, 16 * round(size / 16)) if is_number(size) else 1024
            raise ValueError(f"{name} must be a positive multiple of 16, got {size!r:.80}; the nearest valid size is {nearest}")
    if num_steps is not None and not (is_int(num_steps) and 1 <= num_steps <= MAX_STEPS):
        raise ValueError(f"num_steps must be an integer ≥ 1 (and at most {MAX_STEPS}), got {num_steps!r:.80}")
    if not (is_int(num_images_per_prompt) and num_images_per_prompt >= 1):
        raise ValueError(f"num_images_per_prompt must be an integer ≥ 1, got {num_images_per_prompt!r:.80}")
    if strength is not None and not (is_number(strength) and 0 < strength <= 1):  # None: the variant's default
        raise ValueError(f"strength must lie in (0, 1], got {strength!r:.80}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r:.80}")
    if not (is_number(true_cfg_scale) and true_cfg_scale >= 1):
        raise ValueError(f"true_cfg_scale must be a finite number ≥ 1, got {true_cfg_scale!r:.80}")
    if max_sequence_length is not None and not (is_int(max_sequence_length) and 1 < max_sequence_length <= MAX_SEQUENCE_LENGTH):
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
        if not (is_int(value) and SEED_RANGE[0] <= value <= SEED_RANGE[1]):
            raise ValueError(f"a seed must be an integer in [-2**63, 2**64 - 1] (torch.Generator's range), "
                             f"got {value!r:.80}")
    seeds = [int(value) for value in seeds]
    return (seeds if isinstance(seed, (list, tuple)) else seeds[0]), seeds


def image_seeds(seed, count: int) -> list[int]:
    """The seeds of `count` images asked for with one seed (None: a random one): seed, seed + 1, ...

    Each image then has a seed of its own, the one its metadata records: `flux generate --seed s+i` makes image i
    of `--seed s --num-images n` alone, and the server can batch an image with other requests' images (a single
    seed draws the whole batch from one generator, so its images depend on their place in the batch)."""
    if seed is None:
        seed = random.SystemRandom().randrange(2**63)
    if not (is_int(seed) and SEED_RANGE[0] <= seed and seed + count - 1 <= SEED_RANGE[1]):
        raise ValueError(f"seed must be an integer in [-2**63, 2**64 - {count}] for {count} image(s) (their seeds "
                         f"are seed, seed + 1, ...), got {seed!r:.80}")
    return [int(seed) + index for index in range(count)]


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


def is_number(value) -> bool:
    """A finite int or float (numpy's included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
