"""The training data: a folder of images with captions sorted into aspect-ratio buckets, the frozen encoders'
outputs cached once (`LatentCache`), and the order batches are drawn in (seeded by step, so resuming is exact).

Images are not squashed to one size but sorted into buckets of about the same area and different aspect ratios
(`bucket_sizes`; NovelAI's aspect-ratio bucketing), each resized to cover its bucket and centre-cropped
(`load_image`). The text encoders and the autoencoder are frozen, so their outputs are computed once
(`build_cache`) and kept in memory or on disk: only the transformer then needs to stay in memory while training.

Axes: B batch, C latent channels (16), H and W latent height and width, N image tokens, T text tokens,
D T5's width, V CLIP's width.
"""

import json
import logging
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
from flux.modules.clip import CLIP
from flux.modules.t5 import T5
from flux.weights.checkpoint import CheckpointError, read_safetensors

log = logging.getLogger("flux")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ORIENTATION_TAG = 0x0112  # EXIF


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


# --------------------------------------------------------------------------------------------------
# Each step: its data, its randomness, its learning rate
# --------------------------------------------------------------------------------------------------

class DataOrder:
    """Which examples step k trains on: a function of (seed, k) alone, so resuming needs only k.

    An epoch shuffles each bucket, cuts it into global batches (all of one size, so they stack), and
    shuffles the batches. A bucket that does not fill its last batch wraps around to its start: every
    batch is full, so it splits evenly over the ranks.
    """

    def __init__(self, sizes: list[tuple[int, int]], global_batch: int, seed: int):
        self.buckets = [[i for i, s in enumerate(sizes) if s == size] for size in sorted(set(sizes))]
        self.global_batch, self.seed = global_batch, seed
        self.steps_per_epoch = sum(-(-len(members) // global_batch) for members in self.buckets)
        self._epoch, self._batches = None, []

    def batch(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.epoch(epoch)
        return self._batches[index]

    def epoch(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        size, batches = self.global_batch, []
        for members in self.buckets:
            shuffled = [members[i] for i in rng.permutation(len(members))]
            padded = [shuffled[k % len(shuffled)] for k in range(-(-len(shuffled) // size) * size)]
            batches += [padded[k : k + size] for k in range(0, len(padded), size)]
        return [batches[k] for k in rng.permutation(len(batches))]


def step_seed(*numbers: int) -> int:
    """A 64-bit seed mixed from (seed, step, ...) by numpy's SeedSequence: nearby steps get unrelated streams."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(1, np.uint64)[0])
