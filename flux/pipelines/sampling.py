"""Sampling FLUX.1: initial noise, packing latents into tokens, position ids, the schedule and the Euler sampler.

Rectified flow (Liu et al., 2022; Esser et al., 2024) moves along straight paths x_t = (1 − t)·x0 + t·noise
from noise (t = 1) to data (t = 0); the transformer predicts the velocity v = noise − x0, and sampling is
plain Euler integration of dx/dt = v over a decreasing schedule of t. Everything here matches the official
reference sampler (and diffusers' `FluxPipeline`, which draws the same noise for the same seed).

Axes: B batch, C latent channels (16), H and W latent height and width (image size / 8), N image tokens
(H/2 · W/2), T text tokens.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from torch import Tensor

from flux.modules.transformer import Flux


def get_noise(num_samples: int, height: int, width: int, *, seed: int | Sequence[int], device="cpu",
              dtype=torch.float32) -> Tensor:
    """Image size (height, width) in pixels -> (B, 16, 2·ceil(height/16), 2·ceil(width/16)) standard normal latents.

    Drawn in fp32 from a CPU generator, then moved: the same seed gives the same numbers on every device
    and in every dtype, and the numbers diffusers draws for `torch.Generator("cpu").manual_seed(seed)`.
    One seed draws the whole batch at once; a list of seeds draws each sample from its own generator,
    so that an image is reproducible on its own.
    """
    shape = (16, 2 * math.ceil(height / 16), 2 * math.ceil(width / 16))
    if isinstance(seed, int):
        noise = torch.randn(num_samples, *shape, generator=torch.Generator("cpu").manual_seed(seed))
    else:
        if len(seed) != num_samples:
            raise ValueError(f"got {len(seed)} seeds for {num_samples} samples; give one seed per sample")
        noise = torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seed])
    return noise.to(device=device, dtype=dtype)


def pack(latents: Tensor) -> Tensor:
    """(B, C, H, W) latents -> (B, N, 4C) tokens, one per 2×2 patch, channels outermost."""
    return rearrange(latents, "B C (H ph) (W pw) -> B (H W) (C ph pw)", ph=2, pw=2)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """(B, N, 4C) tokens -> (B, C, H, W) latents, for an image of (height, width) pixels."""
    return rearrange(tokens, "B (H W) (C ph pw) -> B C (H ph) (W pw)",
                     H=math.ceil(height / 16), W=math.ceil(width / 16), ph=2, pw=2)


def image_ids(batch: int, height: int, width: int, *, device="cpu") -> Tensor:
    """(B, N, 3) positions of the image tokens: (0, row, column); axis 0 is unused in text-to-image."""
    rows, columns = math.ceil(height / 16), math.ceil(width / 16)
    ids = torch.zeros(rows, columns, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(columns, device=device)[None, :]
    return repeat(ids, "H W A -> B (H W) A", B=batch)


def text_ids(batch: int, length: int, *, device="cpu") -> Tensor:
    """(B, T, 3) positions of the text tokens: all zero, so text carries no rotary position at all."""
    return torch.zeros(batch, length, 3, device=device)


def get_schedule(num_steps: int, image_seq_len: int, *, shift: bool, base_shift: float = 0.5,
                 max_shift: float = 1.15) -> list[float]:
    """num_steps + 1 times from 1 (noise) down to 0 (image).

    With `shift` (FLUX.1-dev), the times are pushed toward 1 more the larger the image, since more pixels
    keep more of the signal at a given noise level: mu grows linearly with the token count, from
    `base_shift` at 256 tokens to `max_shift` at 4096, and t <- e^mu / (e^mu + (1/t - 1)).
    Schnell was distilled on the plain linear schedule.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        mu = base_shift + (max_shift - base_shift) * (image_seq_len - 256) / (4096 - 256)
        if abs(mu) > 700:  # e^mu would overflow a float: images of tens of thousands of pixels a side
            raise ValueError(f"an image of {image_seq_len} tokens is too large for the shifted schedule "
                             f"(mu = {mu:.3g}); use a smaller image")
        timesteps = math.exp(mu) / (math.exp(mu) + (1 / timesteps - 1))  # t = 0 gives 1/0 = inf, hence 0
    return timesteps.tolist()


def img2img_start(x0: Tensor, noise: Tensor, timesteps: list[float], strength: float) -> tuple[Tensor, list[float]]:
    """Packed image latents and noise (B, N, 64) -> the partly noised start and the rest of the schedule.

    `strength` 1 starts from pure noise; smaller values skip the first int((1 − strength)·steps) steps and
    start from x_t = t·noise + (1 − t)·x0, the point of the straight path at the first remaining time.
    """
    if not 0 < strength <= 1:
        raise ValueError(f"strength must lie in (0, 1], got {strength}")
    start = int((1 - strength) * (len(timesteps) - 1))
    t = timesteps[start]
    return t * noise + (1 - t) * x0, timesteps[start:]


@dataclass(frozen=True)
class Conditioning:
    """What an image-conditioned variant adds to the transformer's input at every step; the loop is the same.

    The FLUX.1 family conditions on images in two ways (../shared/manifests/README.md, "The FLUX.1 family"):
    - `channels` (B, N, C): concatenated after each image token's 64 latent channels, so `img_in` sees 64 + C
      (Fill: C = 320, the masked image's 64 and the mask's 256; Canny/Depth: C = 64, the control image's);
    - `tokens` (B, M, 64) with `token_ids` (B, M, 3): appended after the N image tokens, with their own positions
      (Kontext's references); the prediction for them is dropped, only the first N tokens are integrated.
    Extra text tokens (Redux) need no hook: they are concatenated to the prompt's T5 states before the loop.
    """
    channels: Tensor | None = None
    tokens: Tensor | None = None
    token_ids: Tensor | None = None

    def __post_init__(self):
        if (self.tokens is None) != (self.token_ids is None):
            raise ValueError("Conditioning: tokens and token_ids go together (the reference tokens and their positions)")


def denoise(
    model: Flux, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, vec: Tensor, timesteps: list[float], *,
    guidance: float | None = None, txt_mask: Tensor | None = None,
    negative: tuple[Tensor, Tensor, Tensor | None] | None = None, true_cfg_scale: float = 1.0,
    callback: Callable[[int, float, Tensor], None] | None = None, progress: Callable | None = None,
    condition: Conditioning | None = None,
) -> Tensor:
    """Euler integration from `img` (B, N, 64) at timesteps[0] to timesteps[-1]; returns (B, N, 64) in fp32.

    `txt` (B, T, 4096) and `vec` (B, 768) are the T5 and CLIP conditioning. `guidance` is the distilled
    guidance scale fed to dev-style models (a model input, not classifier-free guidance). `negative`
    = (txt, vec, txt_mask or None) of a negative prompt, with `true_cfg_scale` > 1, adds real classifier-free guidance: two
    predictions per step, uncond + s·(cond − uncond). The latents are integrated in fp32 whatever the
    model's dtype; nothing in the loop waits on the device. `condition` adds a variant's image conditioning.
    """
    batch, dtype = img.shape[0], next(model.parameters()).dtype
    condition = Conditioning() if condition is None else condition
    num_image_tokens = img.shape[1]
    channels = None if condition.channels is None else condition.channels.to(dtype)
    tokens = None if condition.tokens is None else condition.tokens.to(dtype)
    if tokens is not None:  # reference tokens sit after the image tokens, in the positions and in the sequence
        img_ids = torch.cat([img_ids, condition.token_ids.to(img_ids)], dim=1)

    def model_input(x: Tensor) -> Tensor:  # (B, N, 64) fp32 -> (B, N [+ M], 64 [+ C]) in the model's dtype
        x = x.to(dtype)
        if channels is not None:
            x = torch.cat([x, channels], dim=-1)
        return x if tokens is None else torch.cat([x, tokens], dim=1)

    x = img.float()
    guidance_vec = torch.full((batch,), guidance, device=img.device, dtype=dtype) if model.params.guidance_embed else None
    # The positions do not change from step to step, so neither does the rotary table: built once, here.
    rope = model.rope(img_ids, txt_ids)
    if negative is not None and true_cfg_scale > 1:
        negative_txt, negative_vec, negative_mask = negative
        negative_ids = txt_ids[:, : negative_txt.shape[1]]
        negative_rope = rope if negative_ids.shape == txt_ids.shape else model.rope(img_ids, negative_ids)
    steps = list(zip(timesteps[:-1], timesteps[1:]))
    for index, (t_curr, t_next) in enumerate(progress(steps) if progress else steps):
        t_vec = torch.full((batch,), t_curr, device=img.device, dtype=dtype)
        inputs = model_input(x)
        velocity = model(inputs, img_ids, txt, txt_ids, t_vec, vec, guidance_vec, txt_mask=txt_mask, rope=rope)
        velocity = velocity[:, :num_image_tokens].float()  # (B, N, 64): the reference tokens' prediction dropped
        if negative is not None and true_cfg_scale > 1:
            uncond = model(inputs, img_ids, negative_txt, negative_ids, t_vec, negative_vec, guidance_vec,
                           txt_mask=negative_mask, rope=negative_rope)[:, :num_image_tokens].float()
            velocity = uncond + true_cfg_scale * (velocity - uncond)
        x = x + (t_next - t_curr) * velocity
        if callback is not None:
            callback(index, t_curr, x)
    return x
