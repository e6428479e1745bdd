"""The CLIP ViT-L/14 text tower: FLUX.1's pooled text conditioning (one 768-vector per prompt).

CLIP (Radford et al., 2021, "Learning Transferable Visual Models From Natural Language Supervision"):
a GPT-2-style pre-norm transformer with causal attention, learned absolute positions and quick-GELU,
whose final-normed state at the end-of-text token summarises the prompt. FLUX.1 uses that pooled state
(without CLIP's text projection) from openai/clip-vit-large-patch14; its modulation vector `y` is built
from it. Output matches transformers' `CLIPTextModel(...).pooler_output` (tests/test_clip.py).

Attribute names spell the Hugging Face keys (`text_model.encoder.layers.0.self_attn.q_proj.weight`), so
`text_encoder/` of the FLUX.1 repository loads with no renaming. Where those names are only containers
(`text_model`, `embeddings`, `encoder`) they are `nn.ModuleDict`s: namespaces holding the official names.

Axes: B batch, L sequence, Q query positions, K key positions (both L), H heads, D head dim, C width.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int  # the context length: prompts are padded or truncated to it
    layer_norm_eps: float
    # Where the pooled state is read: at the first `eos_token_id`, or, when None, at argmax(input_ids) as
    # OpenAI's code does (the end-of-text token has the largest id). The official config says eos_token_id 2,
    # a known error that makes transformers fall back to argmax; the loader maps 2 to None for that reason.
    eos_token_id: int | None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"CLIPTextConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if not (isinstance(self.layer_norm_eps, float) and self.layer_norm_eps > 0):
            raise ValueError(f"CLIPTextConfig.layer_norm_eps must be a positive float, got {self.layer_norm_eps!r}")
        if self.eos_token_id is not None and not (type(self.eos_token_id) is int and 0 <= self.eos_token_id < self.vocab_size):
            raise ValueError(f"eos_token_id must be None or a token id below vocab_size {self.vocab_size}, "
                             f"got {self.eos_token_id!r}")


# openai/clip-vit-large-patch14's text tower, as in text_encoder/config.json of the FLUX.1 repositories.
CLIP_L = CLIPTextConfig(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, layer_norm_eps=1e-5, eos_token_id=None,
)


class CLIPTextModel(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.text_model = nn.ModuleDict(dict(
            embeddings=nn.ModuleDict(dict(
                token_embedding=nn.Embedding(config.vocab_size, width),
                position_embedding=nn.Embedding(config.max_position_embeddings, width),
            )),
            encoder=nn.ModuleDict(dict(layers=nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers)))),
            final_layer_norm=nn.LayerNorm(width, eps=config.layer_norm_eps),
        ))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L) token ids -> (B, C) pooled output: the final-normed state at the end-of-text token."""
        hidden = self.hidden_states(input_ids, attention_mask)
        if self.config.eos_token_id is None:
            position = input_ids.argmax(dim=-1)  # the first maximum, i.e. the first end-of-text token
        else:
            position = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)  # its first occurrence
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), position]

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L) token ids -> (B, L, C) final-normed states of every token.

        `attention_mask` (B, L), 1/True where a token is real, narrows the causal mask further; with padding
        on the right (as the tokenizer pads) it changes nothing before the end-of-text token.
        """
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(f"CLIP takes at most {self.config.max_position_embeddings} tokens, got {length}")
        embeddings = self.text_model.embeddings
        x = embeddings.token_embedding(input_ids) + embeddings.position_embedding.weight[:length]
        mask = None
        if attention_mask is not None:  # causal and not padding; otherwise SDPA's own causal path
            causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()  # (Q, K)
            mask = causal & rearrange(attention_mask.bool(), "B K -> B 1 1 K")  # (B, 1, Q, K)
        for layer in self.text_model.encoder.layers:
            x = layer(x, mask)
        return self.text_model.final_layer_norm(x)


class CLIP(nn.Module):
    """What FLUX.1 calls: prompts -> (B, hidden_size) pooled states. The tokenizer and the text tower.

    `tokenize` and `encode` are the two halves, for callers who bring their own ids or masks. The state dict
    is the text tower's under `model.`; load the official weights with `flux.load_clip`.
    `tokenizer` is any callable prompts -> (B, L) int64 ids with `max_length` attributes; the files'
    tokenizer is `flux.weights.tokenizers.CLIPTokenizer` (file reading belongs to the floor above this one).
    """

    def __init__(self, model: CLIPTextModel, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    def forward(self, prompts: list[str] | str) -> Tensor:
        """B prompts -> (B, hidden_size), unmasked as the official pipeline runs it."""
        return self.encode(self.tokenize(prompts))

    def tokenize(self, prompts: list[str] | str) -> Tensor:
        """B prompts -> (B, 77) int64 ids on the CPU: start, tokens, end of text, then padding."""
        return self.tokenizer(prompts)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L) ids (on any device) -> (B, hidden_size) pooled output; see `CLIPTextModel.forward`."""
        device = self.model.text_model.embeddings.token_embedding.weight.device
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        return self.model(input_ids.to(device), attention_mask)


class EncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        width = config.hidden_size
        self.self_attn = Attention(config)
        self.layer_norm1 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.layer_norm2 = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """(B, L, C) -> (B, L, C), pre-norm residual blocks."""
        x = x + self.self_attn(self.layer_norm1(x), mask)
        x = x + self.mlp(self.layer_norm2(x))
        return x


class Attention(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        # Declared in the official files' order (k, v, q), so state dicts list them as the checkpoints do.
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """(B, L, C) -> (B, L, C): causal self-attention, or `mask` (B, 1, Q, K) when given (True = attend)."""
        q, k, v = (rearrange(proj(x), "B L (H D) -> B H L D", H=self.num_heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.out_proj(rearrange(out, "B H L D -> B L (H D)"))


class MLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's sigmoid approximation of GELU: it was trained with it, so the exact GELU would be wrong."""
    return x * torch.sigmoid(1.702 * x)
