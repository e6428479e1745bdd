"""The FLUX.1 family as plug-ins to the one sampling loop: what each variant makes of the user's images.

Black Forest Labs' Tools and Kontext models share dev's blocks and differ in what enters the transformer
(../shared/manifests/README.md, "The FLUX.1 family"). Each variant here turns its images into a
`Conditioning` for `flux.pipelines.sampling.denoise`; the loop itself is the same for all:

    variant         img_in   the images become                                            (N image tokens)
    text-to-image   64       nothing; `image=` is image-to-image's starting point (`strength`)
    fill            384      channels (B, N, 320): the packed latent of image·(1 − mask) (64),
                             then the mask 8×8-pixel-unshuffled and packed 2×2 (256)
    control         128      channels (B, N, 64): the packed latent of the control image
    kontext         64       tokens (B, M, 64): each reference's packed latent, after the N image tokens,
                             with position ids (k, row, column) for reference k = 1, 2, ...

Every image is encoded with the autoencoder's posterior mean. The checks run before any heavy work, and a
keyword a variant does not take is a ValueError naming it.

Axes: B batch, N image tokens, M reference tokens, H and W pixels.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor

from flux.modules.transformer import Flux
from flux.pipelines.images import Picture, as_pictures, picture_size, to_pixels
from flux.pipelines.sampling import Conditioning, image_ids, pack

VARIANTS = ("text-to-image", "fill", "control", "kontext")
# img_in's input channels: 64 noisy-latent channels, plus what the variant concatenates to each token.
CHANNELS = {64: "text-to-image", 384: "fill", 128: "control"}
# The sizes Kontext was trained at (width, height), about one megapixel, as Black Forest Labs' code and diffusers
# list them; a reference goes to the one of nearest aspect ratio unless auto_resize=False.
KONTEXT_RESOLUTIONS = [(672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
                       (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
                       (1456, 720), (1504, 688), (1568, 672)]
LORA_HINT = "the base dev model with a control LoRA (pipe.load_lora('flux1-canny-dev-lora.safetensors'))"
NEEDS = {"mask_image": "a Fill model (FLUX.1-Fill-dev)",
         "control_image": f"a Canny or Depth model (FLUX.1-Canny-dev, FLUX.1-Depth-dev) or {LORA_HINT}",
         "auto_resize": "a Kontext model (FLUX.1-Kontext-dev): it resizes the references"}


# --------------------------------------------------------------------------------------------------
# Which variant a checkpoint is
# --------------------------------------------------------------------------------------------------

def infer_variant(model: Flux, *, kontext: bool) -> str:
    """The variant of a built transformer, by img_in's input channels; `kontext` says the files are Kontext's
    (its transformer has dev's shapes exactly, see `is_kontext_checkpoint`)."""
    channels = model.img_in.in_features
    if channels not in CHANNELS:
        raise ValueError(f"img_in takes {channels} input channels, which no FLUX.1 variant has "
                         f"(64 text-to-image/Kontext, 128 Canny/Depth, 384 Fill)")
    variant = CHANNELS[channels]
    return "kontext" if variant == "text-to-image" and kontext else variant


def is_kontext_checkpoint(root: Path) -> bool:
    """Kontext-dev cannot be told from dev by its tensors: by its repository's model_index.json
    (`FluxKontextPipeline`), or by a transformer file whose name says "kontext" (flux1-kontext-dev.safetensors)."""
    index = root / "model_index.json"
    if index.is_file():
        try:
            if json.loads(index.read_text()).get("_class_name") == "FluxKontextPipeline":
                return True
        except (ValueError, AttributeError):
            pass  # the loaders read model_index.json no further; a broken one says nothing about Kontext
    files = [root] if root.is_file() else list(root.glob("*.safetensors")) + list(root.glob("transformer/*.safetensors"))
    return any("kontext" in path.name.lower() for path in files)


def check_variant(requested, model: Flux, *, kontext: bool, source) -> str:
    """The variant to run: what the checkpoint is, or `requested` when it agrees with it."""
    inferred = infer_variant(model, kontext=kontext)
    if requested is None or requested == inferred:
        return inferred
    if requested not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS} or None (read off the checkpoint), got {requested!r:.80}")
    # Kontext shares dev's shapes: a Kontext file whose name does not say so may be declared one.
    if requested == "kontext" and inferred == "text-to-image":
        return requested
    channels = model.img_in.in_features
    hint = f"; {LORA_HINT} becomes one" if requested == "control" and channels == 64 else ""
    raise ValueError(f"variant={requested!r}, but {source} is a {inferred} checkpoint (img_in takes {channels} "
                     f"input channels{', and its files name it Kontext' if inferred == 'kontext' else ''}){hint}")


def family_preset(variant: str, names: str) -> str | None:
    """The configs preset whose sampling defaults a variant uses (flux/modules/configs.py); Canny and Depth
    share their shapes and are told apart by name (the file or repository), Canny's by default."""
    if variant == "control":
        return "flux-depth-dev" if "depth" in names.lower() else "flux-canny-dev"
    return {"fill": "flux-fill-dev", "kontext": "flux-kontext-dev"}.get(variant)


# --------------------------------------------------------------------------------------------------
# A call's images, checked
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageRequest:
    """A call's images, read and checked (`check_images`); sizes and encoding come later (`prepare`)."""
    variant: str
    image: list[Picture] | None = None  # text-to-image's start, Fill's picture, Kontext's references
    mask: list[Picture] | None = None
    control: list[Picture] | None = None
    strength: float = 1.0  # 1: start from pure noise
    auto_resize: bool = True


def check_images(variant: str, *, image, mask_image, control_image, auto_resize, strength, prompts: int,
                 per_prompt: int) -> ImageRequest:
    """The image keywords of a call for `variant` (`prompts` × `per_prompt` outputs), read and checked before
    any heavy work."""
    given = {"image": image, "mask_image": mask_image, "control_image": control_image, "auto_resize": auto_resize}
    takes = {"text-to-image": ("image",), "fill": ("image", "mask_image"), "control": ("control_image",),
             "kontext": ("image", "auto_resize")}[variant]
    for name, value in given.items():
        if value is not None and name not in takes:
            if name == "image":  # only a control model takes no image=
                raise ValueError("image= is not taken by a control model: give the edge or depth map as control_image=")
            raise ValueError(f"{name}= is for {NEEDS[name]}; this is a {variant} model")
    if variant == "fill" and (image is None or mask_image is None):
        missing = "image" if image is None else "mask_image"
        raise ValueError(f"a Fill model needs {missing}=: image= the picture and mask_image= where to repaint "
                         "(white repainted, black kept)")
    if variant == "control" and control_image is None:
        raise ValueError("a control model needs control_image= (a Canny edge map or a depth map, as an image)")
    if strength is not None and variant in ("control", "kontext"):
        raise ValueError(f"strength= is for image-to-image (text-to-image models and Fill), not for {variant}")
    if strength is None:  # text-to-image's image-to-image keeps some of its picture by default; Fill repaints
        strength = 0.8 if variant == "text-to-image" else 1.0
    if auto_resize is not None and not isinstance(auto_resize, bool):
        raise ValueError(f"auto_resize must be True or False, got {auto_resize!r:.80}")
    read = {name: None if given[name] is None else as_pictures(given[name], name=name) for name in given if name != "auto_resize"}
    for name, pictures in read.items():
        # Kontext's references are shared by the batch, however many; the others are one per output or one for all.
        if pictures is not None and not (variant == "kontext" and name == "image") and len(pictures) not in (1, prompts * per_prompt):
            raise ValueError(f"got {len(pictures)} images for {prompts} prompt(s) × {per_prompt} ({name}=); give one "
                             "image, or one per output")
        for picture in pictures or []:
            width, height = picture_size(picture)
            if width < 16 or height < 16:
                raise ValueError(f"{name}= has an image of {width}×{height} pixels; images need at least 16 a side")
    return ImageRequest(variant, image=read["image"], mask=read["mask_image"], control=read["control_image"],
                        strength=float(strength), auto_resize=auto_resize is not False)


def output_size(request: ImageRequest, width, height, *, default: int) -> tuple[int, int]:
    """(width, height) of the output: as asked, else the condition image's (Fill and Control: the first
    picture's, rounded down to multiples of 16; Kontext: the first reference's after resizing), else `default`."""
    first = {"fill": request.image, "control": request.control, "kontext": request.image}.get(request.variant)
    if first:
        size = reference_size(first[0], auto_resize=request.auto_resize) if request.variant == "kontext" else \
            tuple(16 * (side // 16) for side in picture_size(first[0]))
        width, height = (size[0] if width is None else width), (size[1] if height is None else height)
    return (default if width is None else width), (default if height is None else height)


def reference_size(picture: Picture, *, auto_resize: bool) -> tuple[int, int]:
    """(width, height) a Kontext reference is encoded at: its own size rounded down to multiples of 16, or with
    `auto_resize` the trained resolution of nearest aspect ratio (judged on the rounded size, as diffusers)."""
    width, height = (16 * (side // 16) for side in picture_size(picture))
    if auto_resize:
        _, width, height = min((abs(width / height - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
    return width, height


def reference_tokens(request: ImageRequest) -> int:
    """How many tokens the references add to the sequence (for the memory estimate)."""
    if request.variant != "kontext" or not request.image:
        return 0
    return sum(w // 16 * (h // 16) for w, h in (reference_size(p, auto_resize=request.auto_resize) for p in request.image))


# --------------------------------------------------------------------------------------------------
# A call's images, encoded
# --------------------------------------------------------------------------------------------------

def prepare(request: ImageRequest, *, encode, batch: int, width: int, height: int) -> tuple[Conditioning | None, Tensor | None]:
    """The request's Conditioning, and the packed (B, N, 64) latents image-to-image starts from (or None).

    `encode`: (b, 3, H, W) images in [-1, 1] -> (b, 16, H/8, W/8) latents, the autoencoder's posterior mean.
    Pictures given once are encoded once and repeated over the batch.
    """
    def latents(pictures: list[Picture], *, mask: Tensor | None = None) -> Tensor:  # -> (B, N, 64)
        images = to_pixels(pictures, width=width, height=height) * 2 - 1  # the autoencoder's [-1, 1]
        if mask is not None:  # Fill: the part to repaint blanked to 0 (mid-grey), as the official code does
            images = images * (1 - mask)  # one picture and several masks, or the reverse: the larger batch
        return expand(pack(encode(images)), batch)

    start = None
    if request.variant in ("text-to-image", "fill") and request.image and request.strength < 1:
        start = latents(request.image)
    if request.variant == "fill":
        mask = to_pixels(request.mask, width=width, height=height, mask=True)  # (B or 1, 1, H, W) of 0 and 1
        return Conditioning(channels=torch.cat([latents(request.image, mask=mask), expand(mask_tokens(mask), batch)],
                                               dim=-1)), start
    if request.variant == "control":
        return Conditioning(channels=latents(request.control)), None
    if request.variant == "kontext" and request.image:
        return kontext_condition(request, encode=encode, batch=batch), None
    return None, start


def mask_tokens(mask: Tensor) -> Tensor:
    """(B, 1, H, W) pixel mask -> (B, N, 256): each latent pixel's 8×8 block of mask pixels as 64 channels,
    then 2×2 latent pixels per token as the latents are packed."""
    return pack(rearrange(mask, "B 1 (h ph) (w pw) -> B (ph pw) h w", ph=8, pw=8))


def kontext_condition(request: ImageRequest, *, encode, batch: int) -> Conditioning:
    """Kontext's references as tokens after the image tokens. Reference k (from 1) has position ids
    (k, row, column): the first axis, always 0 for the generated image, tells the references apart, and rows
    and columns start at 0 for each. The released model was trained with one reference at index 1."""
    tokens, ids = [], []
    for index, picture in enumerate(request.image, start=1):
        width, height = reference_size(picture, auto_resize=request.auto_resize)
        tokens.append(pack(encode(to_pixels([picture], width=width, height=height) * 2 - 1)))  # (1, M_k, 64)
        positions = image_ids(1, height, width, device=tokens[-1].device)
        positions[..., 0] = index
        ids.append(positions)
    return Conditioning(tokens=expand(torch.cat(tokens, dim=1), batch), token_ids=expand(torch.cat(ids, dim=1), batch))


def expand(tokens: Tensor, batch: int) -> Tensor:
    """(1 or B, ...) -> (B, ...): one picture's tensors shared by the whole batch."""
    return tokens.expand(batch, *tokens.shape[1:]) if tokens.shape[0] == 1 else tokens
