"""The T5 v1.1 encoder: FLUX.1's per-token text conditioning (4096 channels per prompt token).

T5 (Raffel et al., 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer") in its v1.1 form: gated-GELU feed-forward, no biases anywhere, RMSNorm before each sublayer,
and no absolute positions: attention scores get a learned bias per head and per bucket of relative distance.
FLUX.1 uses the encoder half of google/t5-v1_1-xxl, run without an attention mask (padding is attended).
Output matches transformers' `T5EncoderModel(...).last_hidden_state` (tests/test_t5.py).

Attribute names spell the Hugging Face keys (`encoder.block.0.layer.1.DenseReluDense.wi_0.weight`), so
`text_encoder_2/` of the FLUX.1 repository loads with no renaming. Where those names are only containers
(`encoder`, `layer.0`, `layer.1`) they are `nn.ModuleDict`s: namespaces holding the official names.

Axes: B batch, L sequence, Q query positions, K key positions (both L), H heads, D head dim (d_kv),
C model width (d_model).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


@dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int  # the head dim; heads * d_kv need not equal d_model
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int
    relative_attention_max_distance: int  # distances at or beyond this share the last bucket
    layer_norm_epsilon: float

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"T5Config.{name} must be a positive integer, got {value!r}")
        buckets = self.relative_attention_num_buckets
        if buckets % 4:
            raise ValueError(f"relative_attention_num_buckets must be a multiple of 4 (half per direction, "
                             f"half of those exact), got {buckets}")
        if self.relative_attention_max_distance <= buckets // 4:
            raise ValueError(f"relative_attention_max_distance {self.relative_attention_max_distance} must exceed "
                             f"the {buckets // 4} distances that get a bucket each")
        if not (isinstance(self.layer_norm_epsilon, float) and self.layer_norm_epsilon > 0):
            raise ValueError(f"T5Config.layer_norm_epsilon must be a positive float, got {self.layer_norm_epsilon!r}")


# google/t5-v1_1-xxl, as in text_encoder_2/config.json of the FLUX.1 repositories.
T5_XXL = T5Config(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
)


class T5Encoder(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)  # "shared" with the decoder FLUX drops
        self.encoder = nn.ModuleDict(dict(
            block=nn.ModuleList(T5Block(config, has_relative_attention_bias=i == 0) for i in range(config.num_layers)),
            final_layer_norm=RMSNorm(config.d_model, eps=config.layer_norm_epsilon),
        ))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L) token ids -> (B, L, C) last hidden state.

        `attention_mask` (B, L), 1/True where a token is real, is not used by the official FLUX.1 pipeline
        (its T5 attends to the padding); it is there for research on masked conditioning.
        """
        x = self.shared(input_ids)
        # One bias for every layer: block 0 holds the table, the other blocks reuse its output.
        bias = self.relative_position_bias(input_ids.shape[1])  # (1, H, Q, K)
        if attention_mask is not None:
            keep = rearrange(attention_mask.bool(), "B K -> B 1 1 K")
            bias = bias.masked_fill(~keep, torch.finfo(bias.dtype).min)  # (B, H, Q, K)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)

    def relative_position_bias(self, length: int) -> Tensor:
        """Sequence length -> (1, H, Q, K) learned bias added to the attention scores of every layer."""
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        positions = torch.arange(length, device=table.weight.device)
        buckets = relative_position_bucket(
            positions[None, :] - positions[:, None],  # (Q, K): key position minus query position
            num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance,
        )
        return rearrange(table(buckets), "Q K H -> 1 H Q K")


class T5(nn.Module):
    """What FLUX.1 calls: prompts -> (B, max_length, d_model) per-token states. The tokenizer and the encoder.

    `tokenize` and `encode` are the two halves, for callers who bring their own ids or masks. The state dict
    is the encoder's under `model.`; load the official weights with `flux.load_t5`.
    `tokenizer` is any callable prompts -> (B, L) int64 ids with `max_length` and `pad_token_id` attributes; the files'
    tokenizer is `flux.weights.tokenizers.T5Tokenizer` (file reading belongs to the floor above this one).
    """

    def __init__(self, model: T5Encoder, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.pad_token_id = tokenizer.pad_token_id

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    def forward(self, prompts: list[str] | str) -> Tensor:
        """B prompts -> (B, max_length, d_model), unmasked as the official pipeline runs it."""
        return self.encode(self.tokenize(prompts))

    def tokenize(self, prompts: list[str] | str, *, max_length: int | None = None) -> Tensor:
        """B prompts -> (B, max_length) int64 ids on the CPU: pieces, `</s>`, then `<pad>` (id 0)."""
        return self.tokenizer(prompts, max_length=max_length)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L) ids (on any device) -> (B, L, d_model) last hidden state; see `T5Encoder.forward`."""
        device = self.model.shared.weight.device
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        return self.model(input_ids.to(device), attention_mask)


class T5Block(nn.Module):
    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool):
        super().__init__()
        # The official sublayer names: `layer.0` is self-attention, `layer.1` the feed-forward network.
        self.layer = nn.ModuleList([
            nn.ModuleDict(dict(
                SelfAttention=Attention(config, has_relative_attention_bias=has_relative_attention_bias),
                layer_norm=RMSNorm(config.d_model, eps=config.layer_norm_epsilon),
            )),
            nn.ModuleDict(dict(
                DenseReluDense=GatedFeedForward(config),
                layer_norm=RMSNorm(config.d_model, eps=config.layer_norm_epsilon),
            )),
        ])

    def forward(self, x: Tensor, position_bias: Tensor) -> Tensor:
        """(B, L, C) -> (B, L, C), given the (B or 1, H, Q, K) attention bias.

        The residual stream `x` takes the wider of the sublayers' dtypes (fp32 once an fp32 `wo` has added to
        it in an fp16 model); the norms hand the sublayers the weights' dtype.
        """
        attention, feed_forward = self.layer
        x = clamp_to_float16_range(x + attention.SelfAttention(attention.layer_norm(x), position_bias))
        x = clamp_to_float16_range(x + feed_forward.DenseReluDense(feed_forward.layer_norm(x)))
        return x


class Attention(nn.Module):
    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool):
        super().__init__()
        self.num_heads = config.num_heads
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:  # block 0 only: one scalar per (bucket, head), shared by all layers
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def forward(self, x: Tensor, position_bias: Tensor) -> Tensor:
        """(B, L, C) -> (B, L, C): bidirectional self-attention with the bias added to the scores."""
        q, k, v = (rearrange(proj(x), "B L (H D) -> B H L D", H=self.num_heads) for proj in (self.q, self.k, self.v))
        # T5 does not scale the scores by 1/sqrt(D): Mesh TensorFlow folded that factor into the initialisation
        # of q, so the trained weights expect scale 1.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=position_bias.to(q.dtype), scale=1.0)
        return self.o(rearrange(out, "B H L D -> B L (H D)"))


class GatedFeedForward(nn.Module):
    """T5 v1.1's gated-GELU MLP (Shazeer, 2020, "GLU Variants Improve Transformer").

    Its official name, `DenseReluDense`, is T5 1.0's (a ReLU MLP); v1.1 kept the name and changed the maths.
    """

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)  # the gate, through GELU
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)  # the linear branch
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # The tanh approximation of GELU, as trained (transformers' "gelu_new").
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        # `load_t5` keeps `wo` in fp32 when loading in fp16, as transformers does: its outputs exceed fp16's
        # range in T5 v1.1. The fp32 result then carries the residual stream in fp32 from here on.
        return self.wo(h.to(self.wo.weight.dtype))


class RMSNorm(nn.Module):
    """T5's layer norm: no mean subtraction and no bias (Zhang & Sennrich, 2019, RMSNorm)."""

    def __init__(self, dim: int, *, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # In fp32 whatever the weights' dtype, as T5 was run: the squares of fp16 activations overflow and
        # their bf16 mean loses the precision. The result is rounded to the weights' dtype before the scale.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.type_as(self.weight)


def relative_position_bucket(relative_position: Tensor, *, num_buckets: int, max_distance: int) -> Tensor:
    """Signed distances (any shape, key minus query) -> bucket indices in [0, num_buckets), bidirectional.

    Half the buckets are for keys after the query, half for keys before it (or at it). Within each half,
    the first half of the buckets hold one distance each, the rest are logarithmically wider up to
    `max_distance`; farther distances share the last bucket. Mesh TensorFlow's `_relative_position_bucket`.
    """
    half = num_buckets // 2
    buckets = (relative_position > 0).long() * half
    distance = relative_position.abs()
    exact = half // 2
    # The clamp only keeps log() finite where the exact branch is taken anyway.
    log_ratio = torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
    logarithmic = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return buckets + torch.where(distance < exact, distance, logarithmic)


def clamp_to_float16_range(x: Tensor) -> Tensor:
    """fp16 only: pulls the residual stream back into range once it has overflowed.

    T5 v1.1's activations grow past fp16's largest value (65504) in some layers; an inf would turn into
    NaN at the next norm. transformers clamps every fp16 residual to (max - 1000) when an inf appeared (and to
    the finite range otherwise); we do the same. With `load_t5`'s fp32 `wo` the stream is fp32 after the first
    feed-forward and this only guards block 0's attention, as in transformers; in a model cast to fp16 by
    hand (`.half()`) it guards every residual. bf16 and fp32 do not overflow.
    """
    if x.dtype != torch.float16:
        return x
    largest = torch.finfo(x.dtype).max
    limit = torch.where(torch.isinf(x).any(), largest - 1000, largest)
    return x.clamp(min=-limit, max=limit)
