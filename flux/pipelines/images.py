"""The user's pictures as pixel tensors: PIL images, numpy arrays and tensors in, (B, C, H, W) in [0, 1] out.

Image-to-image, Fill, Control and Kontext all start here, so an image is read the same way by every variant.
PIL images are resized with Lanczos on their 8-bit values, before any conversion (what diffusers'
`VaeImageProcessor` does, so the same picture gives the same pixels); arrays and tensors are resized in
float, images with antialiased bicubic and masks with nearest neighbours (a mask's edge stays sharp).
Masks are read as luminance (PIL's "L": 0.299 R + 0.587 G + 0.114 B, alpha ignored) and binarised at 0.5,
as diffusers' Fill pipeline binarises them: white (1) is repainted, black (0) kept.

Axes: B batch, C channels (3 for images, 1 for masks), H and W pixels.
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

# One picture: a PIL image as given, or a (C, H, W) float tensor in [0, 1] with C 1, 3 or 4.
Picture = Image.Image | Tensor
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, the weights of PIL's convert("L")


def as_pictures(value, *, name: str) -> list[Picture]:
    """One image or several (a list, or a batched array or tensor) -> one entry per picture, checked.

    numpy arrays are channels-last like PIL ((H, W), (H, W, C), (B, H, W, C)), uint8 in [0, 255] or float in
    [0, 1]; tensors are channels-first ((H, W), (C, H, W), (B, C, H, W)) in [0, 1]. C is 1, 3 or 4 (alpha).
    """
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError(f"{name} is an empty list; give an image, or a list of images")
    pictures = []
    for index, item in enumerate(items):
        where = name if len(items) == 1 and not isinstance(value, (list, tuple)) else f"{name}[{index}]"
        if isinstance(item, Image.Image):
            pictures.append(item)
        elif isinstance(item, np.ndarray):
            pictures += [_checked(t, where) for t in _from_numpy(item, where)]
        elif isinstance(item, Tensor):
            pictures += [_checked(t, where) for t in _from_tensor(item, where)]
        else:
            raise ValueError(f"{where} must be a PIL image, a numpy array or a torch tensor, got {type(item).__name__}")
    return pictures


def picture_size(picture: Picture) -> tuple[int, int]:
    """(width, height) in pixels."""
    return picture.size if isinstance(picture, Image.Image) else (picture.shape[-1], picture.shape[-2])


def to_pixels(pictures: list[Picture], *, width: int, height: int, mask: bool = False) -> Tensor:
    """Pictures of any sizes -> (B, 3, height, width) images in [0, 1], or (B, 1, height, width) masks of 0 and 1."""
    return torch.stack([_resized(picture, width, height, mask=mask) for picture in pictures])


def _resized(picture: Picture, width: int, height: int, *, mask: bool) -> Tensor:
    if isinstance(picture, Image.Image):
        if picture.mode not in ("RGB", "RGBA", "L"):  # palette, 16-bit, CMYK ...: to 8-bit channels first
            picture = picture.convert("RGBA" if "transparency" in picture.info or picture.mode.endswith("A") else "RGB")
        picture = picture.resize((width, height), Image.LANCZOS)  # the same size: PIL returns a copy
        array = np.asarray(picture.convert("L" if mask else "RGB"), dtype=np.float32) / 255
        pixels = torch.from_numpy(array.copy()).reshape(height, width, -1).permute(2, 0, 1)  # (C, H, W)
    else:
        pixels = picture.float()
        if pixels.shape[-2:] != (height, width):
            resize = dict(mode="nearest") if mask else dict(mode="bicubic", antialias=True, align_corners=False)
            pixels = F.interpolate(pixels[None], size=(height, width), **resize)[0].clamp(0, 1)
        channels = pixels[:3] if pixels.shape[0] >= 3 else pixels.expand(3, -1, -1)  # alpha dropped, grey to RGB
        if mask:
            channels = sum(w * c for w, c in zip(LUMA, channels))[None] if pixels.shape[0] >= 3 else pixels[:1]
        pixels = channels
    return (pixels >= 0.5).float() if mask else pixels


def _from_numpy(array: np.ndarray, where: str) -> list[Tensor]:
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255
    elif not np.issubdtype(array.dtype, np.floating) and array.dtype != np.bool_:
        raise ValueError(f"{where}: a numpy image must be uint8 in [0, 255] or float in [0, 1], got dtype {array.dtype}")
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if tensor.ndim == 2:
        return [tensor[None]]
    if tensor.ndim == 3 and tensor.shape[-1] in (1, 3, 4):
        return [tensor.permute(2, 0, 1)]
    if tensor.ndim == 4 and tensor.shape[-1] in (1, 3, 4):
        return list(tensor.permute(0, 3, 1, 2))
    raise ValueError(f"{where}: a numpy image must be (H, W), (H, W, C) or (B, H, W, C) with C 1, 3 or 4 "
                     f"(channels last, as PIL), got shape {tuple(array.shape)}")


def _from_tensor(tensor: Tensor, where: str) -> list[Tensor]:
    if not (tensor.is_floating_point() or tensor.dtype == torch.bool):
        raise ValueError(f"{where}: an image tensor must hold floats in [0, 1], got dtype {tensor.dtype}")
    tensor = tensor.detach().float().cpu()
    if tensor.ndim == 2:
        return [tensor[None]]
    if tensor.ndim == 3 and tensor.shape[0] in (1, 3, 4):
        return [tensor]
    if tensor.ndim == 4 and tensor.shape[1] in (1, 3, 4):
        return list(tensor)
    raise ValueError(f"{where}: an image tensor must be (H, W), (C, H, W) or (B, C, H, W) with C 1, 3 or 4 "
                     f"(channels first), got shape {tuple(tensor.shape)}")


def _checked(pixels: Tensor, where: str) -> Tensor:
    """A (C, H, W) picture whose values are finite and in [0, 1]: the [-1, 1] of an autoencoder would be
    silently wrong otherwise."""
    if pixels.shape[-1] == 0 or pixels.shape[-2] == 0:
        raise ValueError(f"{where} is empty (shape {tuple(pixels.shape)})")
    if not torch.isfinite(pixels).all():
        raise ValueError(f"{where} holds NaN or infinite values")
    low, high = pixels.min().item(), pixels.max().item()
    if low < 0 or high > 1:
        raise ValueError(f"{where} has values in [{low:.3g}, {high:.3g}]; pixels must lie in [0, 1] "
                         "(uint8 numpy arrays may hold 0-255)")
    return pixels
