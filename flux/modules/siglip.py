"""The SigLIP vision tower: FLUX.1 Redux's image encoder (one 1152-wide state per 14×14 patch of a 384² image).

SigLIP (Zhai et al., 2023, "Sigmoid Loss for Language Image Pre-Training") trains a ViT image tower and a text
tower with a pairwise sigmoid loss; Redux uses the vision tower of google/siglip-so400m-patch14-384, the
"shape-optimised" 400M ViT of Alabdulmohsin et al. (2023, "Getting ViT in Shape"). It is a plain pre-norm ViT:
a strided convolution cuts the image into patches, learned absolute position embeddings are added (no CLS
token), 27 encoder layers of unmasked attention and a tanh-approximated GELU MLP, then a final LayerNorm.
Redux reads that normalised state of every patch, `last_hidden_state` (B, 729, 1152). The attention-pooling
head that SigLIP trained its loss on is in the checkpoint too; it is built (so the file loads strictly) and
`pooled` runs it, but Redux never calls it. Matches transformers' `SiglipVisionModel` (tests/test_siglip.py).

Attribute names spell the keys of FLUX.1-Redux-dev's `image_encoder/model.safetensors` as transformers 5
writes them (`encoder.layers.0.self_attn.q_proj.weight`, `head.attention.in_proj_weight`); files written by
transformers 4 prefix them with `vision_model.`, which the loader strips (flux/weights/redux.py).
The pixels' preprocessing (resize, rescale, normalise) is not part of the network: see flux/weights/redux.py.

Axes: B batch, C channels (3 in, hidden_size out), P patch side in pixels, G patches per image side,
N = G² patches (tokens), H heads, D head dim, K the q/k/v triple.
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn


@dataclass(frozen=True)
class SiglipVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int  # the side of the square input; position embeddings exist for exactly this grid
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    use_head: bool = True  # the attention-pooling head (transformers' vision_use_head)

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                     "patch_size", "num_channels"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"SiglipVisionConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.patch_size > self.image_size:
            raise ValueError(f"patch_size {self.patch_size} must not exceed image_size {self.image_size}")
        if not (isinstance(self.layer_norm_eps, float) and self.layer_norm_eps > 0):
            raise ValueError(f"SiglipVisionConfig.layer_norm_eps must be a positive float, got {self.layer_norm_eps!r}")

    @property
    def num_patches(self) -> int:
        """N: a side that is not a multiple of the patch size loses its last pixels (so400m: 384 = 27·14 + 6)."""
        return (self.image_size // self.patch_size) ** 2


# google/siglip-so400m-patch14-384's vision tower, as in image_encoder/config.json of FLUX.1-Redux-dev:
# 384 / 14 = 27.4, so the strided convolution covers 27 × 14 = 378 pixels and never sees the last 6 rows and
# columns; 27² = 729 tokens.
SO400M_PATCH14_384 = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                        num_attention_heads=16, image_size=384, patch_size=14)

# For tests: 4 heads of 16, MLP 80, 2 layers, a 5×5 grid of 14-pixel patches (25 tokens) from 75 pixels, so that
# the last 5 are dropped as so400m drops 6: no two sizes equal.
TINY = replace(SO400M_PATCH14_384, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
               image_size=75)


class SiglipVisionModel(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        width = config.hidden_size
        # Containers named as the checkpoint's prefixes (`embeddings.`, `encoder.layers.`).
        self.embeddings = nn.ModuleDict(dict(
            patch_embedding=nn.Conv2d(config.num_channels, width, kernel_size=config.patch_size,
                                      stride=config.patch_size),
            position_embedding=nn.Embedding(config.num_patches, width),
        ))
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(EncoderLayer(config)
                                                               for _ in range(config.num_hidden_layers))))
        self.post_layernorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        if config.use_head:
            self.head = PoolingHead(config)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, image_size, image_size) normalised pixels -> (B, N, C) `last_hidden_state` (after post_layernorm)."""
        expected = (self.config.num_channels, self.config.image_size, self.config.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            # The position embeddings are learned for one grid; other sizes would need interpolating them,
            # which the official pipeline never does: the preprocessing resizes every image instead.
            raise ValueError(f"pixel_values must be (B, {', '.join(map(str, expected))}), got {tuple(pixel_values.shape)}; "
                             "resize the images first (Redux.preprocess)")
        embeddings = self.embeddings
        # To the weights' dtype and device: preprocessing gives fp32 pixels on the CPU.
        patches = embeddings.patch_embedding(pixel_values.to(embeddings.patch_embedding.weight))  # (B, C, G, G)
        x = rearrange(patches, "B C Gh Gw -> B (Gh Gw) C") + embeddings.position_embedding.weight  # row-major patches
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)

    def pooled(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, image_size, image_size) -> (B, C): the attention-pooling head's output (transformers' `pooler_output`)."""
        if not self.config.use_head:
            raise ValueError("this SigLIP was built without its pooling head (use_head=False)")
        return self.head(self(pixel_values))


class EncoderLayer(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        width = config.hidden_size
        self.layer_norm1 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, C) -> (B, N, C), pre-norm residual blocks."""
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return x


class Attention(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        # Declared in the checkpoint's order (k, v, q), so state dicts list them as the file does.
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, C) -> (B, N, C): every patch attends to every patch, no mask, scores scaled by 1/sqrt(D)."""
        q, k, v = (rearrange(proj(x), "B N (H D) -> B H N D", H=self.num_heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(rearrange(out, "B H N D -> B N (H D)"))


class MLP(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        # SigLIP was trained with the tanh approximation of GELU (config: gelu_pytorch_tanh); the exact erf
        # form would differ by up to ~1e-3 per activation.
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class PoolingHead(nn.Module):
    """Multihead attention pooling (Lee et al., 2019, "Set Transformer"'s PMA): one learned query, the `probe`,
    attends over all patches; then a residual MLP. Its keys are those of `torch.nn.MultiheadAttention`
    (`attention.in_proj_weight` = q, k, v stacked), which the original implementation used."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        width = config.hidden_size
        self.probe = nn.Parameter(torch.empty(1, 1, width))
        self.attention = PoolingAttention(config)
        self.layernorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, C) -> (B, C). Note the order: the residual is taken after attention, around the MLP only."""
        pooled = self.attention(repeat(self.probe, "1 1 C -> B 1 C", B=x.shape[0]), x)  # (B, 1, C)
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]


class PoolingAttention(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, query: Tensor, x: Tensor) -> Tensor:
        """(B, Q, C) queries over (B, N, C) -> (B, Q, C)."""
        w_q, w_kv = self.in_proj_weight.split([query.shape[-1], 2 * query.shape[-1]])
        b_q, b_kv = self.in_proj_bias.split([query.shape[-1], 2 * query.shape[-1]])
        q = rearrange(F.linear(query, w_q, b_q), "B Q (H D) -> B H Q D", H=self.num_heads)
        k, v = rearrange(F.linear(x, w_kv, b_kv), "B N (K H D) -> K B H N D", K=2, H=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(rearrange(out, "B H Q D -> B Q (H D)"))
