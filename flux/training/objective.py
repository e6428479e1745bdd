"""Training FLUX: the rectified-flow objective, its timestep samplers, and the frozen inputs cached once.

Rectified flow (Liu et al., 2022, "Flow Straight and Fast"; Esser et al., 2024, "Scaling Rectified Flow
Transformers", the SD3 paper FLUX follows) trains the transformer to predict the constant velocity of the
straight path between an image's latents x0 (t = 0) and Gaussian noise ε (t = 1):

    x_t = (1 − t)·x0 + t·ε,    target v = ε − x0,    loss = mean ‖model(x_t, t) − v‖².

The model is called exactly as in sampling (`flux.pipelines.sampling.denoise`): packed 2×2-patch tokens, position ids,
T5 states and CLIP's pooled vector, and a guidance value for dev-style models. The text encoders and the
autoencoder are frozen, so their outputs are computed once (`build_cache`) and kept in a `LatentCache`,
on disk if wanted: only the transformer then needs to stay in memory while training.

The data is a folder of `name.png` + `name.txt` pairs (`read_folder`). Images are not squashed to one size
but sorted into buckets of about the same area and different aspect ratios (`bucket_sizes`; NovelAI's
aspect-ratio bucketing), each resized to cover its bucket and centre-cropped (`load_image`).

The training loop itself is `flux.training.loop`.

Axes: B batch, C latent channels (16), H and W latent height and width, N image tokens, T text tokens,
D T5's width, V CLIP's width.
"""

import math

import torch
from torch import Tensor

from flux.modules.transformer import Flux
from flux.pipelines.sampling import image_ids, pack, text_ids

TIMESTEP_SAMPLERS = ("uniform", "logit_normal", "shifted")


# --------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------

def rectified_flow_loss(
    model: Flux, latents: Tensor, txt: Tensor, vec: Tensor, t: Tensor, *, noise: Tensor,
    guidance: Tensor | float | None = None, txt_mask: Tensor | None = None,
) -> Tensor:
    """(B, C, H, W) normalised latents (what `AutoEncoder.encode` returns), T5 states (B, T, D), CLIP
    vector (B, V), times t (B,) in [0, 1] and noise like `latents` -> the scalar mean-squared error.

    `guidance` (a float or (B,)) is required by guidance-distilled models (dev-style) and ignored
    otherwise, as in sampling. The loss is computed in fp32 whatever the model's dtype, and runs as it is
    under `torch.autocast`.
    """
    if noise.shape != latents.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, latents {tuple(latents.shape)}: they must match")
    if t.shape != (latents.shape[0],):
        raise ValueError(f"t must have shape ({latents.shape[0]},), one time per sample; got {tuple(t.shape)}")
    batch, _, height, width = latents.shape
    dtype = next(model.parameters()).dtype
    x_t = noisy_latents(latents, noise, t)
    target = velocity_target(latents, noise)
    guidance_vec = None
    if model.params.guidance_embed:
        if guidance is None:
            raise ValueError("this model is guidance-distilled (dev-style): pass guidance (the scale to train at)")
        guidance_vec = torch.as_tensor(guidance, device=latents.device, dtype=dtype).expand(batch)
    # Pixel sizes for the ids: 8 pixels per latent pixel, 16 per token.
    img_ids = image_ids(batch, 8 * height, 8 * width, device=latents.device)
    prediction = model(pack(x_t).to(dtype), img_ids, txt.to(dtype), text_ids(batch, txt.shape[1], device=latents.device),
                       t.to(dtype), vec.to(dtype), guidance_vec, txt_mask=txt_mask)
    return torch.mean((prediction.float() - pack(target)) ** 2)


def noisy_latents(latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """(B, C, H, W) data x0, noise ε and times t (B,) -> x_t = (1 − t)·x0 + t·ε, in fp32: the straight path."""
    t = t.float()[:, None, None, None]
    return (1 - t) * latents.float() + t * noise.float()


def velocity_target(latents: Tensor, noise: Tensor) -> Tensor:
    """(B, C, H, W) data x0 and noise ε -> v = dx_t/dt = ε − x0 in fp32, the same at every t."""
    return noise.float() - latents.float()


def sample_timesteps(
    batch: int, *, method: str = "shifted", image_tokens: int | None = None, mean: float = 0.0, std: float = 1.0,
    base_shift: float = 0.5, max_shift: float = 1.15, generator: torch.Generator | None = None, device="cpu",
) -> Tensor:
    """(B,) training times in (0, 1), drawn by one of three rules:

    - "uniform": t ~ U(0, 1);
    - "logit_normal": t = sigmoid(n), n ~ N(mean, std) — SD3's choice, weighting the middle of the path;
    - "shifted" (FLUX): a logit-normal time pushed toward noise by the same resolution-dependent shift the
      dev schedule uses at sampling (`flux.pipelines.sampling.get_schedule`): mu linear in `image_tokens`, from
      `base_shift` at 256 tokens to `max_shift` at 4096, then t <- e^mu / (e^mu + (1/t − 1)).
    Drawn on the CPU from `generator` (reproducible on every device), then moved to `device`.
    """
    if method not in TIMESTEP_SAMPLERS:
        raise ValueError(f"method must be one of {TIMESTEP_SAMPLERS}, got {method!r}")
    if method == "uniform":
        t = torch.rand(batch, generator=generator)
    else:
        t = torch.sigmoid(mean + std * torch.randn(batch, generator=generator))
    if method == "shifted":
        if image_tokens is None:
            raise ValueError("the shifted sampler needs image_tokens (H/16 · W/16 of the training images)")
        mu = base_shift + (max_shift - base_shift) * (image_tokens - 256) / (4096 - 256)
        t = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    return t.to(device)
