"""The FLUX.1 transformer: a rectified-flow MMDiT with double- and single-stream blocks.

FLUX.1 [schnell] and [dev] (Black Forest Labs, 2024) share this architecture; dev adds a guidance
embedding. The design follows Stable Diffusion 3's MMDiT (Esser et al., 2024, "Scaling Rectified Flow
Transformers"): text and image tokens have their own weights but attend jointly, modulated DiT-style
(Peebles & Xie, 2023, adaLN) by one vector built from the timestep, the guidance and CLIP's pooled text.
After the double-stream blocks the two streams are concatenated and share single-stream blocks, whose
attention and MLP run in parallel from one fused input projection (ViT-22B's parallel block).

Attribute names spell the official checkpoint keys (`double_blocks.0.img_attn.qkv.weight`), so
`flux1-schnell.safetensors` loads with `load_state_dict(strict=True)` and no renaming.

Axes: B batch, L sequence (T text tokens, N image tokens), C hidden size, H heads, D head dim (128),
K the q/k/v triple, A the number of position axes (3).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class FluxParams:
    in_channels: int  # 64 = 16 latent channels x a 2x2 patch
    out_channels: int
    vec_in_dim: int  # CLIP's pooled width, 768
    context_in_dim: int  # T5's width, 4096
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int  # double-stream blocks
    depth_single_blocks: int
    axes_dim: tuple[int, ...]  # rotary dims per position axis (time, row, column)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = False  # dev is guidance-distilled; schnell is not

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        if sum(self.axes_dim) != head_dim:
            raise ValueError(f"sum(axes_dim) = {sum(self.axes_dim)} must equal head_dim {head_dim}")
        if any(dim % 2 for dim in self.axes_dim):
            raise ValueError(f"every entry of axes_dim {self.axes_dim} must be even (rotations act on pairs)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


class Flux(nn.Module):
    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        hidden = params.hidden_size
        self.img_in = nn.Linear(params.in_channels, hidden)
        self.time_in = MLPEmbedder(256, hidden)
        self.vector_in = MLPEmbedder(params.vec_in_dim, hidden)
        if params.guidance_embed:
            self.guidance_in = MLPEmbedder(256, hidden)
        self.txt_in = nn.Linear(params.context_in_dim, hidden)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(params) for _ in range(params.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(params) for _ in range(params.depth_single_blocks))
        self.final_layer = LastLayer(hidden, params.out_channels)
        # Training only: recompute each block's activations in the backward pass instead of storing them.
        self.gradient_checkpointing = False

    def forward(
        self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
        guidance: Tensor | None = None, *, txt_mask: Tensor | None = None, rope: Tensor | None = None,
    ) -> Tensor:
        """(B, N, in_channels) packed latents and (B, T, context_in_dim) T5 states -> (B, N, out_channels) velocity.

        `img_ids` (B, N, 3) and `txt_ids` (B, T, 3) are the token positions, `timesteps` and `guidance` (B,)
        lie in [0, 1] and in guidance-scale units, `y` (B, vec_in_dim) is CLIP's pooled output.
        `txt_mask` (B, T), True where a text token is real, is not part of the official model (which
        attends to T5's padding); it is there for research on masked conditioning.
        `rope` is `self.rope(img_ids, txt_ids)` computed by the caller, once for all the steps that share
        the positions (the sampler does); None computes it here.
        """
        self._check_inputs(img, img_ids, txt, txt_ids, timesteps, y, guidance, rope)
        # The modulation vector: one per sample, shared by every block.
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.params.guidance_embed:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)

        img, txt = self.img_in(img), self.txt_in(txt)
        rope = self.rope(img_ids, txt_ids) if rope is None else rope
        mask = joint_attention_mask(txt_mask, img.shape[1]) if txt_mask is not None else None

        for block in self.double_blocks:
            img, txt = self._run(block, img, txt, vec, rope, mask)
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = self._run(block, x, vec, rope, mask)
        img = x[:, txt.shape[1]:]
        return self.final_layer(img, vec)

    def rope(self, img_ids: Tensor, txt_ids: Tensor) -> Tensor:
        """(B, N, 3) image and (B, T, 3) text positions -> (B, 1, T + N, D/2, 2, 2) rotations, for `forward`."""
        # Text tokens come first in the joint sequence, in the rotary table and in the mask alike.
        return rope_table(torch.cat((txt_ids, img_ids), dim=1), self.params.axes_dim, self.params.theta)

    def _run(self, block: nn.Module, *inputs):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *inputs, use_reentrant=False)
        return block(*inputs)

    def _check_inputs(self, img, img_ids, txt, txt_ids, timesteps, y, guidance, rope):
        p = self.params
        expected = [("img", img, (None, None, p.in_channels)), ("txt", txt, (None, None, p.context_in_dim)),
                    ("img_ids", img_ids, (img.shape[0], img.shape[1], len(p.axes_dim))),
                    ("txt_ids", txt_ids, (txt.shape[0], txt.shape[1], len(p.axes_dim))),
                    ("timesteps", timesteps, (img.shape[0],)), ("y", y, (img.shape[0], p.vec_in_dim))]
        for name, tensor, shape in expected:
            if tensor.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, tensor.shape)):
                want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
                raise ValueError(f"Flux input {name!r} has shape {tuple(tensor.shape)}, expected {want}")
        if rope is not None and rope.shape[:3] != (img.shape[0], 1, txt.shape[1] + img.shape[1]):
            raise ValueError(f"rope has shape {tuple(rope.shape)}, expected ({img.shape[0]}, 1, "
                             f"{txt.shape[1] + img.shape[1]}, ...): Flux.rope(img_ids, txt_ids) of these ids")
        if p.guidance_embed and guidance is None:
            raise ValueError("this model is guidance-distilled (FLUX.1-dev style): pass guidance, e.g. 3.5 per sample")


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0, time_factor: float = 1000.0) -> Tensor:
    """(B,) -> (B, dim) sinusoidal embedding, cosines first.

    FLUX samples t in [0, 1] but embeds 1000·t, the range its frequencies were chosen for (DDPM's
    timestep embedding); guidance goes through the same function, so 3.5 is embedded as 3500.
    """
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return embedding.to(t.dtype) if t.is_floating_point() else embedding


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class DoubleStreamBlock(nn.Module):
    """Image and text keep their own weights (MMDiT) and meet only in one joint attention."""

    def __init__(self, params: FluxParams):
        super().__init__()
        hidden, mlp_hidden = params.hidden_size, params.mlp_hidden_dim
        self.num_heads = params.num_heads
        self.img_mod = Modulation(hidden, chunks=6)
        self.img_norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden, params.num_heads, params.qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        # nn.Sequential because the official keys are `img_mlp.0` and `img_mlp.2`.
        self.img_mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden))
        self.txt_mod = Modulation(hidden, chunks=6)
        self.txt_norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden, params.num_heads, params.qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden))

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, rope: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)

        # adaLN with (1 + scale), so zero-initialised modulation starts as the identity.
        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(self.img_norm1(img), img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(self.txt_norm1(txt), txt_shift1, txt_scale1))
        q, k, v = (torch.cat(pair, dim=2) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        out = attention(q, k, v, rope, mask)
        txt_out, img_out = out[:, :txt.shape[1]], out[:, txt.shape[1]:]

        # Gated residuals, x + gate * f(x): one fused multiply-add each (torch.addcmul).
        # In fp16 each residual stream is pulled back from ±inf after every sum, as diffusers does (float16_guard).
        img = float16_guard(torch.addcmul(img, img_gate1, self.img_attn.proj(img_out)))
        img = float16_guard(torch.addcmul(img, img_gate2, self.img_mlp(modulate(self.img_norm2(img), img_shift2, img_scale2))))
        txt = float16_guard(torch.addcmul(txt, txt_gate1, self.txt_attn.proj(txt_out)))
        txt = float16_guard(torch.addcmul(txt, txt_gate2, self.txt_mlp(modulate(self.txt_norm2(txt), txt_shift2, txt_scale2))))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Attention and MLP in parallel on the joint sequence: `linear1` makes q, k, v and the MLP input
    in one matmul, `linear2` maps the concatenated attention output and activated MLP back."""

    def __init__(self, params: FluxParams):
        super().__init__()
        hidden = params.hidden_size
        self.num_heads = params.num_heads
        self.mlp_hidden_dim = params.mlp_hidden_dim
        self.linear1 = nn.Linear(hidden, 3 * hidden + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden + self.mlp_hidden_dim, hidden)
        self.norm = QKNorm(params.head_dim)
        self.pre_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.modulation = Modulation(hidden, chunks=3)

    def forward(self, x: Tensor, vec: Tensor, rope: Tensor, mask: Tensor | None) -> Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = float16_guard(self.linear1(modulate(self.pre_norm(x), shift, scale))).split([3 * x.shape[-1], self.mlp_hidden_dim], dim=-1)
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        out = attention(q, k, v, rope, mask)
        return float16_guard(torch.addcmul(x, gate, self.linear2(torch.cat((out, F.gelu(mlp, approximate="tanh")), dim=-1))))  # x + gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels)
        # Index 1 after a parameterless SiLU: the official key is `adaLN_modulation.1`.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = rearrange(self.adaLN_modulation(vec), "B (K C) -> K B 1 C", K=2)  # shift first here
        return self.linear(modulate(self.norm_final(x), shift, scale))


class Modulation(nn.Module):
    """vec -> `chunks` tensors of shape (B, 1, C): (shift, scale, gate) once or twice."""

    def __init__(self, hidden: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.lin = nn.Linear(hidden, chunks * hidden)

    def forward(self, vec: Tensor) -> Tensor:
        return rearrange(self.lin(F.silu(vec)), "B (K C) -> K B 1 C", K=self.chunks)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """(1 + scale) * x + shift, DiT's adaLN, as one fused multiply-add over x (B, L, C) with (B, 1, C) shift and scale.

    Written as `torch.addcmul` because on a CPU each separate elementwise pass over the activations, and each
    temporary it allocates, costs a few percent of a block; in bf16 the sum is also rounded once, not twice.
    """
    return float16_guard(torch.addcmul(shift, x, 1 + scale))


class SelfAttention(nn.Module):
    """Holds one stream's attention weights; the attention itself is joint, in the block."""

    def __init__(self, hidden: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=qkv_bias)
        self.norm = QKNorm(hidden // num_heads)
        self.proj = nn.Linear(hidden, hidden)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, C) -> q, k, v each (B, H, L, D), q and k RMS-normalised."""
        q, k, v = rearrange(float16_guard(self.qkv(x)), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # The statistics in fp32: in bf16 the mean of squares over 128 values loses most of its digits.
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale


def float16_guard(x: Tensor) -> Tensor:
    """fp16 only: ±inf, an overflow past fp16's largest value, back to ±65504 before the next norm or attention
    turns it into NaN. Finite fp16 values are unchanged, and bf16 and fp32 are returned as they are.

    diffusers clamps FLUX's residual streams so (transformer_flux.py); we also guard both streams of the double
    blocks, the modulated inputs of every block (`modulate`) and the q, k, v projections that feed attention.
    """
    return x.clamp(-65504, 65504) if x.dtype == torch.float16 else x


def attention(q: Tensor, k: Tensor, v: Tensor, rope: Tensor, mask: Tensor | None) -> Tensor:
    """q, k, v (B, H, L, D) -> (B, L, H·D), with rotary positions applied to q and k."""
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    # Contiguous (B, H, L, D): PyTorch's CPU attention kernel runs about 1.3x faster on it than on the
    # (B, L, H, D) memory order the projections leave behind; the copy costs a tenth of that. No-ops in the
    # double blocks, where the text-image concatenation has already made them contiguous.
    out = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=mask)
    return rearrange(out, "B H L D -> B L (H D)")


def joint_attention_mask(txt_mask: Tensor, num_img_tokens: int) -> Tensor:
    """(B, T) text mask -> (B, 1, 1, T + N) boolean key mask; image tokens are always attended."""
    img_mask = txt_mask.new_ones(txt_mask.shape[0], num_img_tokens, dtype=torch.bool)
    return rearrange(torch.cat((txt_mask.bool(), img_mask), dim=1), "B L -> B 1 1 L")


def rope_table(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> Tensor:
    """(B, L, A) positions -> (B, 1, L, D/2, 2, 2) rotation matrices, one per pair of channels.

    FLUX's rotary embedding has three axes: the head dim (128) is split 16/56/56 among a time axis
    (unused by text-to-image: always 0), the image row and the image column. Text tokens sit at
    position (0, 0, 0), so they rotate not at all. Computed in fp32, whatever the model's dtype.
    """
    tables = []
    for axis, dim in enumerate(axes_dim):
        frequencies = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=ids.device) / dim)
        angles = ids[..., axis].float()[..., None] * frequencies  # (B, L, dim/2)
        cos, sin = torch.cos(angles), torch.sin(angles)
        tables.append(torch.stack([cos, -sin, sin, cos], dim=-1))
    return rearrange(torch.cat(tables, dim=-2), "B L P (i j) -> B 1 L P i j", i=2, j=2)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotates each adjacent channel pair (x[2p], x[2p+1]) of x (B, H, L, D) by its angle, in fp32.

    A rotation by θ of the pair (x0, x1) is the complex product (x0 + i·x1)·(cos θ + i·sin θ), and the first
    column of each rotation matrix in `rope` is (cos θ, sin θ): one complex multiply, one pass over x, where
    the matrix-times-vector form takes four.
    """
    pairs = torch.view_as_complex(rearrange(x.float(), "B H L (P two) -> B H L P two", two=2))
    rotation = torch.view_as_complex(rope[..., 0].contiguous())  # (B, 1, L, P): cos θ + i·sin θ
    return rearrange(torch.view_as_real(pairs * rotation), "B H L P two -> B H L (P two)").type_as(x)
