"""The FLUX.1 autoencoder: a KL-regularised convolutional VAE from images to 16-channel latents at 1/8 size.

The architecture is latent diffusion's autoencoder (Rombach et al., 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models"; the `taming-transformers` code of Esser et al., 2021) widened to 16 latent
channels, as in Black Forest Labs' `flux/modules/autoencoder.py`: ResNet blocks with GroupNorm(32), one
single-head self-attention in the middle of each half, strided-convolution downsampling and
nearest-neighbour upsampling. The encoder predicts a diagonal Gaussian (mean, log-variance) per latent pixel.

Attribute names spell the official `ae.safetensors` keys (`encoder.down.0.block.0.norm1.weight`), so the
file loads with `load_state_dict(strict=True)` and no renaming. Matches diffusers' `AutoencoderKL` to fp32
rounding (tests/test_autoencoder.py), once the latent scale and shift below are applied to it.

Large images can be encoded and decoded in overlapping tiles blended linearly (`Tiling`), which bounds the
memory at the cost of per-tile GroupNorm statistics and attention context (see `Tiling`).

Axes: B batch, C channels, H height, W width (of the image or of the latent grid, as stated), L = H·W
positions in the attention.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

GROUPS = 32  # GroupNorm groups everywhere: every channel count must be a multiple of this


@dataclass(frozen=True)
class AutoEncoderParams:
    resolution: int = 256  # the training resolution; recorded in the official config, unused by the maths
    in_channels: int = 3
    ch: int = 128  # width of the first level; level i has ch * ch_mult[i] channels
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # one entry per level; all but the last halve the size
    num_res_blocks: int = 2  # per encoder level; the decoder has one more per level
    z_channels: int = 16
    # The latent statistics of FLUX's autoencoder, measured by Black Forest Labs: the transformer works on
    # scale_factor * (z - shift_factor), roughly unit-variance and zero-mean. Not stored in ae.safetensors.
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self):
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ValueError(f"ch_mult {self.ch_mult} must be a non-empty tuple of positive multipliers")
        widths = [self.ch * m for m in self.ch_mult]
        if self.ch <= 0 or any(w % GROUPS for w in widths):
            raise ValueError(f"every level's width ch * ch_mult = {widths} must be a positive multiple of {GROUPS} (GroupNorm groups)")
        for name in ("in_channels", "out_ch", "z_channels", "num_res_blocks"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be positive")
        if self.scale_factor == 0:
            raise ValueError("scale_factor must be non-zero (decode divides by it)")

    @property
    def downsampling(self) -> int:
        """Image pixels per latent pixel along each side: 8 for the official four levels."""
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class Tiling:
    """When and how `encode` and `decode` split large inputs into overlapping tiles, in image pixels.

    Tiles are `size` pixels square, neighbours share `overlap` pixels, and the shared band is blended with
    linear ramps, so there are no seams. Each tile is normalised (GroupNorm) and attends (mid-block) only
    within itself, so a tiled result differs from the whole-image one by a little everywhere, not only at
    tile borders; larger tiles differ less. Tiling switches on by itself for images of more than `auto_above`
    pixels (2 megapixels: FLUX's native 1024² and 1024×2048 stay whole), and `max_batch` bounds how many
    samples go through the network at once (None: the whole batch).
    """

    size: int = 512
    overlap: int = 128
    auto_above: int = 2048 * 1024
    max_batch: int | None = None

    def __post_init__(self):
        if not 0 < self.overlap < self.size:
            raise ValueError(f"Tiling overlap {self.overlap} must be positive and smaller than the tile size {self.size}")
        if self.max_batch is not None and self.max_batch <= 0:
            raise ValueError(f"Tiling max_batch {self.max_batch} must be positive, or None for the whole batch")


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams, *, tiling: Tiling = Tiling()):
        super().__init__()
        self.params = params
        self.tiling = tiling  # a plain setting, not a parameter: replace it to tile differently
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)

    def encode(self, x: Tensor, *, generator: torch.Generator | None = None, tile: bool | None = None) -> Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, z_channels, H/8, W/8) latents, as the transformer sees them.

        The posterior mean by default, which is deterministic (the official code and diffusers sample the
        posterior when they encode a condition image; its log-variance is small, so the two differ little);
        a sample from the posterior when a `generator` is given. `tile`: True or False forces tiling on or off, None (default) decides by the image size.
        """
        self._check(x, "encode", self.params.in_channels, self.params.downsampling, "(B, C, H, W) images")
        moments = self._run(self.encoder, x, tile, latent_input=False)  # (B, 2 z_channels, H/8, W/8)
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if generator is not None:  # from the whole image's (blended) moments; the log-variance is not clamped
            noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise.to(mean.device)
        return self.params.scale_factor * (z - self.params.shift_factor)

    def decode(self, z: Tensor, *, tile: bool | None = None) -> Tensor:
        """(B, z_channels, H/8, W/8) latents -> (B, 3, H, W) images in about [-1, 1] (not clamped).

        `tile`: True or False forces tiling on or off, None (default) decides by the image size.
        """
        self._check(z, "decode", self.params.z_channels, 1, "(B, z_channels, H/8, W/8) latents")
        z = z / self.params.scale_factor + self.params.shift_factor
        return self._run(self.decoder, z, tile, latent_input=True)

    def _run(self, network: nn.Module, x: Tensor, tile: bool | None, *, latent_input: bool) -> Tensor:
        """`network` (the encoder or the decoder) on `x`, in batch slices, each whole or in tiles."""
        tiling, factor = self.tiling, self.params.downsampling
        pixels_per_input = factor if latent_input else 1  # image pixels along a side per input pixel
        if tile is None:
            tile = x.shape[2] * x.shape[3] * pixels_per_input**2 > tiling.auto_above
        if tile and (tiling.size % factor or tiling.overlap % factor):
            raise ValueError(f"Tiling size {tiling.size} and overlap {tiling.overlap} must be multiples of {factor} "
                             "image pixels, so that tiles fall on whole latent pixels")
        # Channels-last memory order (B, H, W, C) through the network: the CPU's convolutions (oneDNN) run
        # faster on it, about 1.15x for a whole decode, and GroupNorm, the nearest upsampling and the mid-block
        # attention's "B C H W -> B 1 (H W) C" all take it as it is. The result goes back to the usual order.
        x = x.contiguous(memory_format=torch.channels_last)
        outputs = []
        for batch in x.split(tiling.max_batch or len(x)):
            if tile:
                outputs.append(tiled(network, batch, size=tiling.size // pixels_per_input,
                                     overlap=tiling.overlap // pixels_per_input,
                                     scale=factor if latent_input else 1 / factor))
            else:
                outputs.append(network(batch))
        return torch.cat(outputs).contiguous()

    @staticmethod
    def _check(x: Tensor, method: str, channels: int, multiple: int, expected: str):
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"AutoEncoder.{method} expects {expected} with C = {channels}; got shape {tuple(x.shape)}")
        height, width = x.shape[2:]
        if height % multiple or width % multiple:
            raise ValueError(
                f"AutoEncoder.{method}: height and width must be multiples of {multiple}, got {height}×{width}; "
                f"resize or crop the image, e.g. to {height // multiple * multiple}×{width // multiple * multiple}"
            )


def tiled(function, x: Tensor, *, size: int, overlap: int, scale: float) -> Tensor:
    """(B, C, H, W) -> (B, C', H·scale, W·scale): `function` on overlapping `size`² tiles of `x`, blended.

    `size` and `overlap` are in input pixels. Tiles start every `size - overlap` pixels, the last one flush
    with the far edge, so every tile has the full size; each output pixel is the weighted mean of the tiles
    covering it, the weights ramping linearly over the band a tile shares with a neighbour (and flat at the
    image border), so tiles fade into each other with no seam.
    """
    height, width = x.shape[2:]
    out_overlap = round(overlap * scale)
    total = weight_sum = None
    for top in tile_starts(height, size, overlap):
        for left in tile_starts(width, size, overlap):
            out = function(x[:, :, top : top + size, left : left + size]).float()  # sums in fp32, even in bf16
            if total is None:
                total = out.new_zeros(*out.shape[:2], round(height * scale), round(width * scale))
                weight_sum = out.new_zeros(total.shape[2:])
            rows = ramp(out.shape[2], out_overlap, first=top == 0, last=top + size >= height, like=out)
            cols = ramp(out.shape[3], out_overlap, first=left == 0, last=left + size >= width, like=out)
            weight = rows[:, None] * cols[None, :]  # (h, w)
            region = (slice(round(top * scale), round(top * scale) + out.shape[2]),
                      slice(round(left * scale), round(left * scale) + out.shape[3]))
            total[:, :, region[0], region[1]] += out * weight
            weight_sum[region] += weight
    return (total / weight_sum).to(x.dtype)


def tile_starts(length: int, size: int, overlap: int) -> list[int]:
    """Where tiles of `size` start along an axis of `length`: every size - overlap, the last flush with the end."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size, size - overlap))
    return starts + [length - size]


def ramp(length: int, overlap: int, *, first: bool, last: bool, like: Tensor) -> Tensor:
    """(length,) blending weights: rising over the first `overlap` entries unless at the image's start, falling
    over the last ones unless at its end. Strictly positive, so a pixel's weights never sum to zero."""
    weight = torch.ones(length, dtype=like.dtype, device=like.device)
    edge = (torch.arange(overlap, dtype=like.dtype, device=like.device) + 0.5) / overlap
    if not first:
        weight[:overlap] = edge
    if not last:
        weight[-overlap:] = torch.minimum(weight[-overlap:], edge.flip(0))
    return weight


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        widths = [p.ch * m for m in p.ch_mult]
        levels, width = [], p.ch
        for i, out_width in enumerate(widths):
            levels.append(DownLevel(width, out_width, p.num_res_blocks, downsample=i < len(widths) - 1))
            width = out_width
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(width)
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, 2 * p.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) images -> (B, 2 z_channels, H/8, W/8): posterior mean, then log-variance."""
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        self.conv_in = nn.Conv2d(p.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        # `up` is indexed like the encoder's `down` (up.0 is the full-resolution level) but runs from the
        # last index to the first: the official code builds it reversed and inserts each level at the front.
        levels, width = [], widths[-1]
        for i in reversed(range(len(widths))):
            levels.insert(0, UpLevel(width, widths[i], p.num_res_blocks + 1, upsample=i > 0))
            width = widths[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, p.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """(B, z_channels, H/8, W/8) unscaled latents -> (B, out_ch, H, W) images."""
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))


class DownLevel(nn.Module):
    def __init__(self, in_width: int, out_width: int, num_blocks: int, *, downsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_width if j == 0 else out_width, out_width) for j in range(num_blocks))
        # The official levels also hold an empty `attn` list (attention at no resolution): no weights, omitted.
        self.downsample = Downsample(out_width) if downsample else nn.Identity()  # Identity: no weights

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x)


class UpLevel(nn.Module):
    def __init__(self, in_width: int, out_width: int, num_blocks: int, *, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_width if j == 0 else out_width, out_width) for j in range(num_blocks))
        self.upsample = Upsample(out_width) if upsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x)


class MidBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.block_1 = ResnetBlock(width, width)
        self.attn_1 = AttnBlock(width)
        self.block_2 = ResnetBlock(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class ResnetBlock(nn.Module):
    def __init__(self, in_width: int, out_width: int):
        super().__init__()
        self.norm1 = group_norm(in_width)
        self.conv1 = nn.Conv2d(in_width, out_width, 3, padding=1)
        self.norm2 = group_norm(out_width)
        self.conv2 = nn.Conv2d(out_width, out_width, 3, padding=1)
        # "Network in network": a 1×1 convolution, only where the width changes.
        self.nin_shortcut = nn.Conv2d(in_width, out_width, 1) if in_width != out_width else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # In place where the tensor is a fresh temporary (the norms' and the convolution's outputs): each pass
        # over a decoder activation (up to 128 channels at full resolution) that allocates costs page faults.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(self.nin_shortcut(x))  # the shortcut + the residual branch


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with 1×1 convolutions as the projections."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = group_norm(width)
        self.q = nn.Conv2d(width, width, 1)
        self.k = nn.Conv2d(width, width, 1)
        self.v = nn.Conv2d(width, width, 1)
        self.proj_out = nn.Conv2d(width, width, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "B C H W -> B 1 (H W) C") for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # one head of width C, scaled by 1/sqrt(C)
        out = rearrange(out, "B 1 (H W) C -> B C H W", H=x.shape[2], W=x.shape[3])
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric padding, one zero row and column at the bottom and right only, as the original
        # taming-transformers code: a stride-2 3×3 convolution then maps H to exactly H/2.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """The official nearest 2× upsampling followed by the 3×3 convolution, computed at the input's size.

        The upsampled picture repeats each input pixel in a 2×2 square, so an output pixel of phase (a, b) (its
        row's and column's parity) sees only 2×2 distinct input pixels through the 3×3 window: rows i-1, i for
        a = 0 and rows i, i+1 for a = 1, likewise for columns. The taps that land on one input pixel sum into
        one, which folds the 3×3 kernel into one 2×2 kernel per phase (`subpixel_kernels`). All four phases are
        one 2×2 convolution with 4× the output channels over the input padded by one pixel: 16 taps at the
        input's size instead of 9 at four times it, 2.25× fewer multiply-adds (about 1.8× faster at 512
        channels on a CPU). The same sums as the official layer, in another order: fp32 results differ by
        rounding (~1e-6 relative; tests/test_autoencoder.py compares with the upsample-then-convolve form).
        """
        out_channels, (height, width) = self.conv.out_channels, x.shape[2:]
        kernels = subpixel_kernels(self.conv.weight).to(x.dtype)  # (4 out, in, 2, 2), phases (a b) outermost
        phases = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernels, self.conv.bias.repeat(4))  # (B, 4 out, H + 1, W + 1)
        phases = rearrange(phases, "B (a b C) H W -> B a b C H W", a=2, b=2)
        out = torch.empty(x.shape[0], out_channels, 2 * height, 2 * width, dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last)  # the order the rest of the network runs in
        for a in (0, 1):  # phase a's pixel i sits at position i + a of the padded output (see above)
            for b in (0, 1):
                out[:, :, a::2, b::2] = phases[:, a, b, :, a : a + height, b : b + width]
        return out


def subpixel_kernels(weight: Tensor) -> Tensor:
    """(out, in, 3, 3) kernel -> (4·out, in, 2, 2): the 2×2 kernel of each output phase (a, b) of a nearest 2×
    upsampling followed by this convolution (see `Upsample.forward`), phases (a, b) outermost. Summed in fp32."""
    w = weight.float()

    def fold(k: Tensor, axis: int) -> Tensor:  # taps (-1, 0, +1) along `axis` -> phase 0: (-1, 0 + 1), phase 1: (-1 + 0, +1)
        first, middle, last = k.unbind(axis)
        return torch.stack([torch.stack([first, middle + last], axis), torch.stack([first + middle, last], axis)])

    rows = fold(w, 2)  # (a, out, in, 2, 3)
    both = fold(rows, 4)  # (b, a, out, in, 2, 2)
    return rearrange(both, "b a O I kh kw -> (a b O) I kh kw")


def group_norm(width: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, width, eps=1e-6)
