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

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from flux.modules.autoencoder import AutoEncoder
from flux.weights.checkpoint import CheckpointError, read_safetensors
from flux.modules.clip import CLIP
from flux.modules.transformer import Flux
from flux.pipelines.sampling import image_ids, pack, text_ids
from flux.modules.t5 import T5

TIMESTEP_SAMPLERS = ("uniform", "logit_normal", "shifted")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ORIENTATION_TAG = 0x0112  # EXIF


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


# --------------------------------------------------------------------------------------------------
# The data: a folder of images with captions, sorted into buckets
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    image: Path
    caption: str


def read_folder(folder) -> list[Example]:
    """The `name.png` + `name.txt` pairs of `folder` (not its subfolders), sorted by file name.

    Any of IMAGE_SUFFIXES counts as an image; every image needs its caption file (UTF-8, surrounding
    whitespace stripped), or this fails naming the images that have none.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder (expected a folder of name.png + name.txt pairs)")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    missing = [p.name for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise ValueError(f"{folder}: {len(missing)} image(s) without a caption file, e.g. {missing[:3]}; "
                         f"add {Path(missing[0]).stem}.txt next to {missing[0]}")
    return [Example(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in images]


def bucket_sizes(resolution: int, *, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """The (width, height) buckets for training at `resolution`: sides multiples of `step`, each as large as
    fits in resolution² pixels for its width, aspect ratios up to `max_aspect` either way; sorted by width.

    `step` must be a multiple of 16: 8 pixels per latent pixel, 2 latent pixels per token.
    """
    if step <= 0 or step % 16:
        raise ValueError(f"bucket step must be a positive multiple of 16 (one token is 16×16 pixels), got {step}")
    if resolution < step:
        raise ValueError(f"resolution {resolution} is smaller than the bucket step {step}")
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be ≥ 1, got {max_aspect}")
    sizes = []
    for width in range(step, int(resolution * max_aspect) + 1, step):
        height = resolution * resolution // width // step * step  # the tallest that keeps the area ≤ resolution²
        if height >= step and 1 / max_aspect <= width / height <= max_aspect:
            sizes.append((width, height))
    return sizes


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to an image's (in log ratio, so 2:1 and 1:2 are as far from 1:1)."""
    return min(buckets, key=lambda size: abs(math.log(size[0] / size[1]) - math.log(width / height)))


def image_size(path) -> tuple[int, int]:
    """(width, height) of an image file as it is shown, from its header: a camera's EXIF orientation 5–8
    (turned a quarter) swaps the stored sides."""
    with Image.open(path) as file:
        width, height = file.size
        return (height, width) if file.getexif().get(ORIENTATION_TAG) in (5, 6, 7, 8) else (width, height)


def load_image(path, width: int, height: int) -> Tensor:
    """An image file -> (3, height, width) in [-1, 1]: upright (EXIF), scaled to cover the size, then centre-cropped."""
    with Image.open(path) as file:
        image = ImageOps.exif_transpose(file).convert("RGB")
    scale = max(width / image.width, height / image.height)
    resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(resized, Image.LANCZOS)
    left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()  # (3, height, width) in [0, 255]
    return pixels / 127.5 - 1


# --------------------------------------------------------------------------------------------------
# Caching the frozen encoders' outputs
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_captions(t5: T5, clip: CLIP, captions: list[str], *, batch_size: int = 8) -> tuple[Tensor, Tensor]:
    """B captions -> T5 states (B, T, d_model) and CLIP vectors (B, hidden), on the CPU, for caching.

    Encoded in slices of `batch_size` on whatever device the encoders are on.
    """
    states, vectors = [], []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        states.append(t5(chunk).cpu())
        vectors.append(clip(chunk).cpu())
    return torch.cat(states), torch.cat(vectors)


@torch.no_grad()
def encode_images(ae: AutoEncoder, images: Tensor, *, batch_size: int = 8) -> Tensor:
    """(B, 3, H, W) images in [-1, 1] -> (B, 16, H/8, W/8) normalised latents (posterior means) on the CPU."""
    parameter = next(ae.parameters())
    latents = [ae.encode(chunk.to(parameter.device, parameter.dtype)).float().cpu()
               for chunk in images.split(batch_size)]
    return torch.cat(latents)


@dataclass
class LatentCache:
    """What training reads instead of images and captions: the autoencoder's and text encoders' outputs."""

    latents: list[Tensor]  # one (C, H, W) per example; H and W differ between buckets
    captions: list[str]  # one per example
    embeddings: dict[str, tuple[Tensor, Tensor]]  # text -> T5 states (T, D) and CLIP vector (V,)

    def text(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """Example indices -> their captions' T5 states (B, T, D) and CLIP vectors (B, V)."""
        pairs = [self.embeddings[self.captions[i]] for i in indices]
        return torch.stack([txt for txt, _ in pairs]), torch.stack([vec for _, vec in pairs])

    def prompts(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Any cached texts (sample prompts) -> (B, T, D) and (B, V)."""
        return torch.stack([self.embeddings[t][0] for t in texts]), torch.stack([self.embeddings[t][1] for t in texts])


def build_cache(
    examples: list[Example], sizes: list[tuple[int, int]], *, ae: AutoEncoder, t5: T5, clip: CLIP,
    extra_texts: tuple[str, ...] = (), batch_size: int = 8,
) -> LatentCache:
    """Encodes every example's image at its (width, height) in `sizes`, and every caption and extra text
    (sample prompts) once. Images are read `batch_size` at a time, so memory holds one batch of pixels."""
    latents: list[Tensor | None] = [None] * len(examples)
    for size in sorted(set(sizes)):
        members = [i for i, s in enumerate(sizes) if s == size]
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            pixels = torch.stack([load_image(examples[i].image, *size) for i in chunk])
            for i, z in zip(chunk, encode_images(ae, pixels, batch_size=batch_size)):
                latents[i] = z
    texts = list(dict.fromkeys([e.caption for e in examples] + list(extra_texts)))
    txt, vec = encode_captions(t5, clip, texts, batch_size=batch_size)
    return LatentCache(latents, [e.caption for e in examples], {text: (txt[k], vec[k]) for k, text in enumerate(texts)})


def save_cache(cache: LatentCache, path, *, fingerprint: str = "") -> None:
    """Writes the cache to one safetensors file; `fingerprint` (any string describing what was encoded, and
    with what) is stored with it, so that `load_cache` can tell a stale cache from a current one."""
    texts = list(cache.embeddings)
    tensors = {f"latents.{i}": z.contiguous() for i, z in enumerate(cache.latents)}
    for k, text in enumerate(texts):
        tensors[f"txt.{k}"], tensors[f"vec.{k}"] = (t.contiguous() for t in cache.embeddings[text])
    metadata = {"captions": json.dumps(cache.captions), "texts": json.dumps(texts), "fingerprint": fingerprint}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def load_cache(path, *, fingerprint: str | None = "") -> LatentCache | None:
    """The cache saved at `path`, or None if there is none or it was made with another fingerprint
    (None: any fingerprint will do)."""
    path = Path(path)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
    if fingerprint is not None and metadata.get("fingerprint") != fingerprint:
        return None
    try:
        captions, texts = json.loads(metadata["captions"]), json.loads(metadata["texts"])
    except (KeyError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a latent cache written by flux ({error!r}); delete it") from None
    tensors = read_safetensors(path)
    return LatentCache([tensors[f"latents.{i}"] for i in range(len(captions))], captions,
                       {text: (tensors[f"txt.{k}"], tensors[f"vec.{k}"]) for k, text in enumerate(texts)})
