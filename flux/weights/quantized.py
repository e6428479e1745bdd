"""Quantized weight storage: one kind of `Linear` whose weight lives in another format.

FLUX's Linear layers hold 99.5 % of its parameters, so every way of shrinking the model — fp8 (flux/weights/fp8.py),
GGUF blocks, int8 — is the same idea: keep the weight in its compact form and turn it into arithmetic at each
call. `QuantizedLinear` is that idea once. A format subclasses it and says how its storage becomes a weight
(`dequantize`); it may also override `forward` where the format computes in its own arithmetic (int8×int8) or
can fold a scale into the product (fp8). Everything else is shared:

- it is an `nn.Linear` (same `in_features`, `out_features`, `bias`), so what looks for Linears — LoRA's forward
  hooks, the checkpoint key names, block offload, `torch.compile` — finds it unchanged;
- the stored tensors are registered on the module (the weight keeps the official name `weight`), so
  `state_dict()`, `.to(device)` and offload move them as they are;
- `replace_linears` swaps a built model's Linears for quantized ones by glob patterns over module names, one layer
  at a time, so the peak memory beyond the model is one layer's copy.

The weights are frozen: train a LoRA on top instead. The model files never mention any of this: like LoRA it acts
on a built model from outside.
"""

import fnmatch
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The Linears of the double- and single-stream blocks: 99.5 % of the weights. The embedders and the final layer
# (the first and last maps of every step, whose errors no later layer averages out) stay in the compute dtype,
# as the quantized files in circulation keep them.
BLOCK_TARGETS = ("double_blocks.*", "single_blocks.*")


class QuantizedLinear(nn.Linear):
    """y = x · dequantize(storage)ᵀ + b. Subclasses hold the storage and define `dequantize`.

    A base class rather than a helper function because every caller (LoRA, offload, `state_dict`) must see one
    `nn.Linear`; it carries no behaviour beyond that contract.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: Tensor | None):
        # nn.Linear's own weight, on meta: shapes only. The subclass replaces it under the same name, in place
        # (a Parameter, keeping the official key order `weight`, `bias`), or deletes it to register a buffer.
        with torch.device("meta"):
            super().__init__(in_features, out_features, bias=bias is not None)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantize(self, dtype) -> Tensor:
        """The (out, in) weight in `dtype`, made from the storage at each call."""
        raise NotImplementedError(f"{type(self).__name__} must define dequantize(dtype)")

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def replace_linears(model: nn.Module, *, targets=BLOCK_TARGETS,
                    make: Callable[[str, nn.Linear], nn.Module]) -> list[str]:
    """Swaps each plain `nn.Linear` of `model` named by `targets` (glob patterns) for `make(name, linear)`, in place;
    returns the names swapped. Refuses a layer carrying a LoRA (its hook belongs to the replaced object)."""
    linears = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    chosen = [name for name in linears if any(fnmatch.fnmatchcase(name, pattern) for pattern in targets)]
    if not chosen:
        raise ValueError(f"no nn.Linear of the model matches {targets}; its Linears are named like {linears[:4]}")
    for name in chosen:  # by name, holding no reference to a replaced layer
        linear = model.get_submodule(name)
        if hasattr(linear, "lora"):
            raise ValueError(f"{name} carries a LoRA: quantize first, then add or load LoRAs")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, make(name, linear))
    return chosen


def quantized_layers(model: nn.Module, kind: type = QuantizedLinear) -> dict[str, QuantizedLinear]:
    """{name: layer} for every quantized Linear of `model` (of one format with `kind`)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, kind)}
