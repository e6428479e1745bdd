"""int8 W8A8 compute for the FLUX transformer: int8 weights, int8 activations, int32 accumulation.

The matrix products of the double- and single-stream blocks are nearly all of a step's arithmetic. Here each
of them multiplies int8 by int8 into int32 (`torch._int_mm`: oneDNN's VNNI kernels on a CPU, cuBLASLt's on a
GPU), which on a Zen 4 CPU runs at about twice the rate of bf16 (benchmarks/README.md, "int8"):

- weights: per output channel, symmetric, W ≈ W8 · s_w with s_w = max_k |W[n, k]| / 127, one fp32 scale per
  output channel, fixed at quantization time (`quantize_weight`);
- activations: per token (row), symmetric, made at every call from the layer's input, x ≈ x8 · s_x with
  s_x = max_k |x[m, k]| / 127 ("dynamic" quantization: no calibration data is needed);
- y[m, n] = (Σ_k x8[m, k] · W8[n, k]) · s_x[m] · s_w[n] + b[n], the int32 sum exact, the rescale and the bias
  in the activations' dtype.

What the products gain, the passes around them partly give back: in eager mode the quantization of each input
and the rescale of each output are passes over memory of their own, and attention, the norms and the
modulation (a fifth of a real-width step at 512²) are unchanged. On a Zen 4 with 2 threads a real-width step is
1.45× faster than bf16 in eager mode; under `flux.runtime.compile.compile_blocks`, which fuses the
quantization and the rescale into the elementwise work before and after each product, 1.5-1.6× faster than the
compiled bf16 step (benchmarks/README.md, "int8").

Per-token and per-channel scales are what SmoothQuant's and SVDQuant's W8A8 baselines use for FLUX-scale
transformers; outliers in a few activation channels are the known risk, which the per-token scale absorbs
for the token but not for the channel. tests/test_int8.py bounds the error against the unquantized model.

Like fp8 storage (flux/weights/fp8.py), this acts on a built model from outside: `quantize_int8` swaps the
blocks' attention and MLP Linears for `Int8Linear`s (flux/weights/quantized.py). What stays in the compute
dtype, and why:
- the embedders and the final layer: the first and last maps of every step, whose errors no later layer
  averages out (0.5 % of the weights);
- the modulation Linears (`*_mod.lin`, `modulation.lin`): they run on one vector per image (a matrix-vector
  product, where int8 saves little time) and their outputs scale every activation of the block, so their
  error is multiplied rather than averaged.

Where no int8 matrix product is fast — a CPU without VNNI (AVX-512 VNNI, AVX-VNNI or AMX), where oneDNN's
int8 kernels emulate the dot products — `quantize_int8` says so in a log line and the layers dequantize their
weight and multiply in the compute dtype: the results equal W8A16 (weights int8, activations unquantized)
and the memory saving stays, the speed-up does not.
"""

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux.weights.pages import release_pages
from flux.weights.quantized import QuantizedLinear, quantized_layers, replace_linears

log = logging.getLogger("flux")

INT8_MAX = 127  # symmetric: -128 is never used, so that negating a code cannot overflow
# The blocks' attention and MLP Linears; see the module docstring for what stays in the compute dtype.
TARGETS = ("double_blocks.*_attn.qkv", "double_blocks.*_attn.proj", "double_blocks.*_mlp.*",
           "single_blocks.*.linear1", "single_blocks.*.linear2")
WEIGHT_SCALE = "weight_scale"


class Int8Linear(QuantizedLinear):
    """A Linear computing in int8: y = (x8 · W8ᵀ) · s_x · s_w + b, x8 and s_x made from x at each call.

    `weight` (out, in) int8 keeps the official name; `weight_scale` (out,) fp32 is beside it. The bias stays in
    the compute dtype. `int_mm` False multiplies the dequantized weight in the input's dtype instead (the
    fallback for hardware without fast int8 products; see the module docstring).
    """

    def __init__(self, weight: Tensor, scale: Tensor, bias: Tensor | None, *, int_mm: bool = True):
        """`weight` (out, in) int8, `scale` (out,) fp32, `bias` (out,) or None."""
        if weight.dtype != torch.int8 or weight.ndim != 2 or scale.shape != weight.shape[:1] or scale.dtype != torch.float32:
            raise ValueError(f"Int8Linear takes a 2-D int8 weight and one fp32 scale per output channel, got "
                             f"{weight.dtype} {tuple(weight.shape)} and {scale.dtype} {tuple(scale.shape)}")
        super().__init__(weight.shape[1], weight.shape[0], bias=bias)
        self.weight = nn.Parameter(weight, requires_grad=False)  # integer Parameters cannot require grad
        self.register_buffer(WEIGHT_SCALE, scale)
        self.int_mm = int_mm

    def dequantize(self, dtype) -> Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)  # (out, in)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[:-1].numel()
        if not (self.int_mm and fast_int_mm(x.device.type, rows, self.in_features, self.out_features)):
            return super().forward(x)  # W8A16: the dequantized weight, the product in x's dtype
        x_codes, x_scale = quantize_rows(x.reshape(rows, self.in_features))  # (M, in) int8, (M, 1) fp32
        # (M, in) · (in, out): the transposed view of the (out, in) weight; _int_mm reads it as it is.
        accumulated = torch._int_mm(x_codes, self.weight.t())  # (M, out) int32, exact
        # The rescale in x's dtype, in place, one broadcast factor at a time: materialising the (M, out) outer
        # product s_x · s_w, or rescaling in fp32, makes the epilogue 3-4× slower (an int8 product's epilogue
        # is its one overhead over bf16's). In bf16 that rounds three times (2^-9 each), below the int8 error.
        out = accumulated.to(x.dtype).mul_(x_scale.to(x.dtype)).mul_(self.weight_scale.to(x.dtype))
        if self.bias is not None:
            out = out.add_(self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight=int8, int_mm={self.int_mm}"


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(M, K) floats -> (M, K) int8 codes and (M, 1) fp32 scales, x ≈ codes · scale, one scale per row.

    scale = max|row| / 127, so each row's largest value lands on ±127 and none saturates; each value is
    rounded to the nearest code (ties to even). An all-zero row gets scale 1 (its codes are all 0 either way).
    Three passes over x, the fewest eager PyTorch allows (this runs before every int8 product): the row maxima
    in x's own dtype (exact: the largest |value| is one of the values), the division into a fresh fp32 tensor
    (x's dtype promoted by the fp32 scale), and the rounding with the conversion. No clamp: |x| / scale is at
    most 127 up to the division's rounding (2^-24 relative), far from the 127.5 that would round past it.
    """
    largest = x.abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(largest > 0, largest / INT8_MAX, 1.0)
    return torch.div(x, scale).round_().to(torch.int8), scale


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(out, in) weight of any float dtype -> (out, in) int8 codes and (out,) fp32 scales, one per output channel."""
    largest = weight.abs().amax(dim=1)
    if not torch.isfinite(largest).all():
        raise ValueError(f"cannot quantize a weight holding non-finite values to int8 (rows {_bad_rows(largest)})")
    codes, scale = quantize_rows(weight)
    return codes, scale[:, 0]


def _bad_rows(largest: Tensor) -> list[int]:
    return torch.nonzero(~torch.isfinite(largest))[:4, 0].tolist()


def quantize_int8(model: nn.Module, *, targets=TARGETS) -> nn.Module:
    """Stores the weights of `model`'s `nn.Linear`s named by `targets` (glob patterns) in int8, in place, and
    makes them compute in int8 where the hardware has fast int8 products; returns the model.

    One layer at a time (`replace_linears`), so the memory beyond the model is one layer's copy; the bf16 or fp32
    weight it replaces is freed, or, for a view of a memory-mapped file, its pages are given back at once. The
    default targets are the blocks' attention and MLP Linears (see the module docstring). Quantize before adding
    LoRAs: a LoRA then runs beside the int8 layer, in the compute dtype.
    """
    device = next(model.parameters()).device.type
    int_mm = device != "cpu" or cpu_has_int8_dot_products()
    if not int_mm:
        log.info("int8: this CPU has no VNNI/AMX int8 dot products; the layers store int8 weights and multiply "
                 "in the compute dtype (memory saved, no speed-up)")

    def make(name: str, linear: nn.Linear) -> Int8Linear:
        try:
            weight, scale = quantize_weight(linear.weight.detach())
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
        # Reading a memory-mapped weight made its pages resident, and they would stay so (counted in the
        # process's memory) while anything else maps the file: give them back now (flux/weights/pages.py).
        release_pages([linear.weight])
        return Int8Linear(weight, scale, linear.bias, int_mm=int_mm)

    replace_linears(model, targets=targets, make=make)
    return model


def int8_layers(model: nn.Module) -> dict[str, Int8Linear]:
    return quantized_layers(model, Int8Linear)


def fast_int_mm(device_type: str, rows: int, in_features: int, out_features: int) -> bool:
    """Whether `torch._int_mm` takes these shapes on this device: cuBLASLt needs more than 16 rows and sizes
    that are multiples of 8; the CPU kernel takes any shape (the CPU check is `cpu_has_int8_dot_products`)."""
    if device_type == "cuda":
        return rows > 16 and in_features % 8 == 0 and out_features % 8 == 0
    return device_type == "cpu"


@functools.cache
def cpu_has_int8_dot_products() -> bool:
    """Whether this CPU multiplies int8 vectors natively (AVX-512 VNNI, AVX-VNNI or AMX-INT8), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:  # not Linux: unknown, so the safe answer (the fallback is right everywhere, only slower)
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))
