"""fp8 weight storage for the FLUX transformer: one byte per weight, upcast to the activations' dtype at each matmul.

The Linear layers of the double- and single-stream blocks hold 99.5 % of FLUX.1's 11.9 B parameters. Here each
of them keeps its weight in float8_e4m3fn (4 exponent bits, 3 mantissa bits, largest value 448) with one fp32
scale per layer, chosen as max|W| / 448 so the layer's largest weight lands on e4m3's largest value:
W ≈ W8 · scale. At each call the fp8 weight is upcast to the input's dtype and multiplied in it, so the same
stored model computes in bf16 on a GPU and in fp32 on a CPU without bf16 arithmetic, where fp32 is ~4× faster.
The transformer then takes ~12 GB instead of 23.8 GB (bf16) or 47.6 GB (fp32).

Like LoRA, this acts on a built model from outside (flux/weights/quantized.py): `to_fp8` swaps the blocks' `nn.Linear`s for `Fp8Linear`s,
whose weights keep their official names, each with a `scale_weight` beside it. That is ComfyUI's "scaled fp8"
layout, so `save_fp8` writes files ComfyUI reads (with the `scaled_fp8` marker it looks for), and
`load_fp8_flow_model` reads those, the community fp8 files (every tensor in e4m3, no scales: scale 1) and the
official bf16 files (quantized tensor by tensor as they are read).

What stays in the compute dtype, as the scaled-fp8 converters in circulation keep it: the embedders (`img_in`,
`txt_in`, `time_in`, `vector_in`, `guidance_in`) and the final layer — 0.5 % of the weights, but the first and
last maps of every step, whose errors no later layer averages out — and every bias and norm scale. The
embedders also tell the compute dtype: `Pipeline` reads it off `img_in`, and `flux.pipelines.sampling.denoise` off the
model's first parameter, which is `img_in`'s.

One caution: PyTorch counts fp8 as floating point, so `model.to(torch.float32)` upcasts the stored weights
too (the results stay right; the memory is gone). Move a model with `.to(device)`, and choose the compute
dtype when loading.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux.weights.checkpoint import CheckpointError, load_into, write_safetensors
from flux.weights.layouts import infer_flux_params, read_flow_checkpoint
from flux.weights.quantized import BLOCK_TARGETS, QuantizedLinear, quantized_layers, replace_linears
from flux.modules.transformer import Flux

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max: e4m3fn has no infinities, 0x7F/0xFF are its NaNs
TARGETS = BLOCK_TARGETS  # glob patterns over module names
# ComfyUI's names: `<layer>.scale_weight` multiplies the stored weight; `<layer>.scale_input`, for its fp8
# matrix products, scales the activations, which we never quantize; `scaled_fp8` marks the file.
SCALE, INPUT_SCALE, MARKER = "scale_weight", "scale_input", "scaled_fp8"


class Fp8Linear(QuantizedLinear):
    """A Linear whose weight is stored as float8_e4m3fn times one fp32 scale: y = x (W8 · scale)ᵀ + b.

    The fp8 weight keeps the name `weight` (a frozen Parameter, as ComfyUI's files hold it) with `scale_weight`
    beside it. The bias stays in the compute dtype.
    """

    def __init__(self, weight: Tensor, scale: Tensor, bias: Tensor | None):
        """`weight` (out, in) in float8_e4m3fn, `scale` a 0-dim fp32 tensor, `bias` (out,) or None."""
        if weight.dtype != FP8 or weight.ndim != 2 or scale.shape != () or scale.dtype != torch.float32:
            raise ValueError(f"Fp8Linear takes a 2-D float8_e4m3fn weight and a 0-dim fp32 scale, got "
                             f"{weight.dtype} {tuple(weight.shape)} and {scale.dtype} {tuple(scale.shape)}")
        super().__init__(weight.shape[1], weight.shape[0], bias=bias)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer(SCALE, scale)

    def dequantize(self, dtype) -> Tensor:
        weight, factor = upcast(self.weight, dtype)
        return weight * (self.scale_weight * factor).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        weight, factor = upcast(self.weight, x.dtype)
        # The scale multiplies the product, (x W8ᵀ) · scale + b in one fused pass, rather than every weight first.
        scale = self.scale_weight * factor
        out = F.linear(x, weight)
        return out * scale if self.bias is None else torch.addcmul(self.bias, out, scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight={str(self.weight.dtype).removeprefix('torch.')}"


def upcast(weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, float]:
    """(out, in) fp8 weight -> (w, factor): w in `dtype`, and weight = w · factor exactly.

    On a GPU this is `weight.to(dtype)`. On a CPU PyTorch converts fp8 one element at a time (~5 ns a weight
    here, about what the matrix product it feeds costs per weight at 256² pixels), so the bits are moved
    instead: the e4m3 byte `s eeee mmm` written as the fp16 `s 0eeee mmm 0000000` is the same number times 2^-8
    (fp16's exponent bias is 15, e4m3's 7; subnormals land on subnormals), and fp16 -> fp32 is one vector
    instruction. Measured in FLUX.1's blocks at 256² (benchmarks/README.md), fp8 storage then costs 20 % over
    fp32 weights rather than 60 %, when the allocator reuses freed memory. The 2^8 goes into the layer's
    scale. The NaN codes would read as ±480: `load_fp8_flow_model` refuses files holding them. fp16 compute
    keeps the plain conversion, as w · 2^-8 would push small products toward fp16's subnormals.
    """
    if weight.dtype != FP8 or weight.device.type != "cpu" or dtype == torch.float16:
        return weight.to(dtype), 1.0
    bits = weight.view(torch.uint8).to(torch.int16)
    # Shifting left by 8 puts the sign on fp16's sign bit; the arithmetic shift right copies it into bit 14,
    # which the mask clears: s eeee mmm -> s 0 eeee mmm 0000000.
    bits = bits.bitwise_left_shift_(8).bitwise_right_shift_(1).bitwise_and_(~(1 << 14))
    return bits.view(torch.float16).to(dtype), 256.0


def quantize(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(out, in) weight of any float dtype -> (W8 in float8_e4m3fn, 0-dim fp32 scale), W ≈ W8 · scale.

    scale = max|W| / 448 maps the largest weight onto e4m3's largest value, so none saturates and the rest keep
    as many of e4m3's 3 mantissa bits as their size allows; each is rounded to the nearest e4m3 value (ties
    to even), a relative error of at most 2^-4 for all but the weights 2^17 times smaller than the largest.
    """
    values = weight.to(torch.float32, copy=True)  # a copy even from fp32: divided in place below
    largest = values.abs().amax()
    if not torch.isfinite(largest):
        raise ValueError(f"cannot quantize a weight holding {largest.item()} to fp8")
    scale = largest / E4M3_MAX if largest > 0 else torch.ones((), device=weight.device)
    # Clamped: x / scale may exceed 448 by a rounding of the division, and CUDA turns what exceeds it into NaN.
    return values.div_(scale).clamp_(-E4M3_MAX, E4M3_MAX).to(FP8), scale.float()


def to_fp8(model: nn.Module, *, targets=TARGETS) -> nn.Module:
    """Stores the weights of `model`'s `nn.Linear`s named by `targets` (glob patterns) in fp8, in place; returns it.

    One layer at a time (`replace_linears`): each replaced layer's old weight is freed as soon as nothing else
    holds it. A model on `meta` gets the structure only (for loading). The default targets are every Linear of
    the double- and single-stream blocks (see the module docstring).
    """
    def make(name: str, linear: nn.Linear) -> Fp8Linear:
        if linear.weight.is_meta:
            weight, scale = torch.empty(linear.weight.shape, dtype=FP8, device="meta"), torch.empty((), device="meta")
        else:
            weight, scale = quantize(linear.weight.detach())
        return Fp8Linear(weight, scale, linear.bias)

    replace_linears(model, targets=targets, make=make)
    return model


def fp8_layers(model: nn.Module) -> dict[str, Fp8Linear]:
    return quantized_layers(model, Fp8Linear)


# --------------------------------------------------------------------------------------------------
# Files: loading (community fp8, ComfyUI scaled fp8, official) and saving (ComfyUI scaled fp8)
# --------------------------------------------------------------------------------------------------

def load_fp8_flow_model(path, *, device="cpu", dtype=torch.bfloat16) -> Flux:
    """The FLUX transformer with its blocks' Linear weights stored in fp8 and everything else in `dtype`,
    which is also the dtype it computes in; from any file or folder `flux.load_flow_model` reads.

    - fp8 weights are kept as they are, zero-copy from the file's memory map: the community files (every
      tensor e4m3, no scales: scale 1) and ComfyUI's scaled fp8 files (`<layer>.scale_weight`);
    - weights in other dtypes (the official bf16 file) are quantized as they are read (`quantize`), so the
      memory is the fp8 model's plus the pages of the file being read, which the kernel may drop;
    - the other tensors (embedders, final layer, biases, norms) are converted to `dtype`; fp8 ones exactly,
      scaled ones as weight · scale.
    """
    state_dict, source = read_flow_checkpoint(Path(path))
    weights, scales = split_scales(state_dict, source=source)
    params = infer_flux_params(weights, source=source)
    with torch.device("meta"):
        model = to_fp8(Flux(params).to(dtype))
    layers = fp8_layers(model)
    prepared = {}
    for name, tensor in weights.items():
        layer, _, leaf = name.rpartition(".")
        if layer in layers and leaf == "weight":
            prepared[name], prepared[f"{layer}.{SCALE}"] = _fp8_weight(tensor, scales.get(layer), name, source)
        elif layer in scales and leaf == "weight":  # a scaled layer we keep in `dtype`, e.g. an embedder
            prepared[name] = (tensor.float() * scales[layer]).to(dtype)
        else:
            # Copied (they are small), so that the file's memory map lives on only through fp8 weights read from it.
            prepared[name] = tensor.to(dtype, copy=True) if tensor.is_floating_point() else tensor
    # No dtype: each tensor takes the model's own, fp8 weights and fp32 scales as prepared, the rest `dtype`.
    return load_into(model, prepared, source=source, device=device).eval().requires_grad_(False)


def _fp8_weight(tensor: Tensor, scale: Tensor | None, name: str, source) -> tuple[Tensor, Tensor]:
    if tensor.dtype == FP8:
        # e4m3fn's NaNs, which `upcast` would read as ±480, are 0x7F and 0xFF: the largest byte there can be read
        # as int8 and as uint8. Two reductions, no temporary: ~5 s for FLUX.1's 11.8 B weights on 2 cores.
        bits = tensor.view(torch.uint8)
        if bits.numel() and (bits.max() == 0xFF or bits.view(torch.int8).max() == 0x7F):
            raise CheckpointError(f"{source}: tensor {name!r} holds fp8 NaN values; the file is corrupt, re-download it")
        return tensor, torch.ones(()) if scale is None else scale
    try:
        return quantize(tensor if scale is None else tensor.float() * scale)
    except ValueError as error:
        raise CheckpointError(f"{source}: tensor {name!r}: {error}") from None


def split_scales(state_dict: dict[str, Tensor], *, source) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A (official-named) state dict -> (the weights, {layer: 0-dim fp32 scale}) for ComfyUI's scaled fp8 files.

    Drops the `scaled_fp8` marker and the input scales (for fp8 activations, which we never make), after
    checking each scale belongs to a layer the file has and is one finite number.
    """
    weights, scales = {}, {}
    for name, tensor in state_dict.items():
        layer, _, leaf = name.rpartition(".")
        if name == MARKER:
            continue
        if leaf not in (SCALE, INPUT_SCALE):
            weights[name] = tensor
            continue
        if f"{layer}.weight" not in state_dict:
            raise CheckpointError(f"{source}: tensor {name!r} scales a layer the file does not have (no "
                                  f"{layer + '.weight'!r}); the file is corrupt or mixes two models")
        if tensor.numel() != 1 or tensor.ndim > 1 or not tensor.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name!r} is {tensor.dtype} of shape {tuple(tensor.shape)}; "
                                  "a scale is one floating-point number per layer (shape () or (1,)): per-channel "
                                  "or block scales are not supported")
        value = tensor.float().reshape(())
        if not torch.isfinite(value):
            raise CheckpointError(f"{source}: tensor {name!r} is {value.item()}; a scale must be a finite number")
        if leaf == SCALE:
            scales[layer] = value
    return weights, scales


def dequantize_scaled(state_dict: dict[str, Tensor], *, source, dtype: torch.dtype) -> dict[str, Tensor]:
    """A scaled fp8 state dict -> plain tensors, each scaled weight as weight · scale in `dtype`; for
    `flux.load_flow_model`, which loads every tensor in one dtype. Dicts without scales pass through."""
    weights, scales = split_scales(state_dict, source=source)
    for layer, scale in scales.items():
        weights[f"{layer}.weight"] = (weights[f"{layer}.weight"].float() * scale).to(dtype=dtype)
    return weights


def save_fp8(model: nn.Module, path) -> None:
    """Writes a model with fp8 layers (`to_fp8`, `load_fp8_flow_model`) as a ComfyUI scaled fp8 file: the
    official names, fp8 weights with their `<layer>.scale_weight`, the rest as it is held, and the marker.

    One tensor at a time (`write_safetensors`). `load_fp8_flow_model` reads it back bit for bit.
    """
    if not fp8_layers(model):
        raise ValueError("the model has no fp8 layers: convert it with flux.weights.fp8.to_fp8 first")
    state = model.state_dict()
    carried = [name for name in state if ".lora." in name]
    if carried:
        raise ValueError(f"the model carries a LoRA ({carried[0]!r}, ...): save it with flux.weights.lora.save_lora, and "
                         "unload_lora before saving the base model")
    # Two elements: ComfyUI reads that as "upcast the weights and multiply in the compute dtype", what Fp8Linear
    # does; with none it may also quantize the activations to fp8 on GPUs that can, which these files do not
    # have input scales for.
    state[MARKER] = torch.zeros(2, dtype=FP8)
    write_safetensors(path, {name: (tuple(t.shape), t.dtype) for name, t in state.items()}, state.items(),
                      metadata={"format": "pt"})
