"""int8 W8A8 compute (flux/weights/int8.py), checked against the format's definition and the unquantized model.

The references are written here from the definition (per-output-channel weight scales max|W|/127, per-token
activation scales max|x|/127, round half to even, y = Σ x8·W8 · s_x · s_w + b) in float64, never through
flux.weights.int8's code paths; the error against the unquantized layer or model is bounded from the
rounding it makes (each code off by at most half a step).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_model import random_model, tiny_inputs
from torch import nn

from flux import Pipeline
from flux.cli.main import main as cli
from flux.pipelines.snapshots import builtin_model
from flux.weights.int8 import Int8Linear, cpu_has_int8_dot_products, int8_layers, quantize_int8, quantize_weight

requires_int_mm = pytest.mark.skipif(not cpu_has_int8_dot_products(), reason="this CPU has no int8 dot products")


def reference_w8a8(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What W8A8 with per-token and per-channel scales computes, in float64, from the definition."""
    x, weight = x.double(), weight.double()
    w_scale = weight.abs().amax(dim=1, keepdim=True) / 127
    w_codes = torch.round(weight / w_scale)
    x_scale = x.abs().amax(dim=-1, keepdim=True) / 127
    x_codes = torch.round(x / x_scale)
    out = (x_codes @ w_codes.T) * x_scale * w_scale.T  # the sums of integer products are exact in float64
    return out if bias is None else out + bias.double()


def random_linear(in_features=384, out_features=200, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.normal_(0, in_features**-0.5)
        linear.bias.normal_(0, 0.1)
    return linear


def test_weight_codes_are_per_channel_symmetric_and_round_to_nearest():
    weight = torch.randn(64, 96, dtype=torch.float64) * torch.logspace(-3, 1, 64, dtype=torch.float64)[:, None]
    codes, scale = quantize_weight(weight)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (64,)
    assert codes.abs().max() <= 127 and (codes.abs().amax(dim=1) == 127).all()  # each row's largest weight lands on ±127
    # Two fp32 roundings (the weight to fp32, then the division), 2^-24 each.
    torch.testing.assert_close(scale.double(), weight.abs().amax(dim=1) / 127, rtol=2.5e-7, atol=0)
    # Round to nearest: every weight within half a step (plus the fp32 rounding of the scale) of its code.
    error = (codes.double() * scale.double()[:, None] - weight).abs() / scale.double()[:, None]
    assert error.max() <= 0.5 + 1e-5, error.max()


def test_weight_quantization_refuses_non_finite_values():
    weight = torch.randn(4, 8)
    weight[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values to int8 \(rows \[2\]\)"):
        quantize_weight(weight)


@requires_int_mm
@pytest.mark.parametrize("dtype, tolerance", [
    # Errors relative to the largest output. fp32: the int32 sums are exact; the int32 -> fp32 conversion, the
    # two rescales and the bias each round once (2^-24 of the value): ~2.4e-7, with room.
    (torch.float32, 1e-6),
    # bf16: the input codes are made from bf16 values (exact in fp32); the same four roundings, 2^-9 each: 8e-3.
    (torch.bfloat16, 1e-2),
])
def test_int8_linear_computes_w8a8_as_defined(dtype, tolerance):
    linear = random_linear()
    x = torch.randn(2, 37, 384).to(dtype)
    layer = Int8Linear(*quantize_weight(linear.weight.detach()), linear.bias.detach().to(dtype))
    assert layer.int_mm
    expected = reference_w8a8(x, linear.weight.detach(), linear.bias.detach().to(dtype))
    out = layer(x)
    assert out.dtype == dtype and out.shape == (2, 37, 200)
    error = ((out.double() - expected).abs().max() / expected.abs().max()).item()
    assert error <= tolerance, f"max relative error {error:.3g} against the W8A8 definition"


def test_int8_linear_stays_within_the_rounding_bound_of_the_unquantized_layer():
    linear = random_linear()
    x = torch.randn(50, 384, dtype=torch.float64)
    layer = Int8Linear(*quantize_weight(linear.weight.detach()), linear.bias.detach())
    out, exact = layer(x.float()).double(), F.linear(x, linear.weight.double(), linear.bias.double())
    # Each weight is off by at most s_w/2 and each input by at most s_x/2, so every output by at most
    # Σ_k (|x_k| s_w/2 + |W_k| s_x/2 + s_x s_w/4), plus fp32's rounding of the rescale.
    w_scale = linear.weight.detach().double().abs().amax(dim=1) / 127
    x_scale = x.abs().amax(dim=1, keepdim=True) / 127
    bound = (x.abs().sum(1, keepdim=True) * w_scale / 2 + x_scale * linear.weight.double().abs().sum(1) / 2
             + 384 * x_scale * w_scale / 4)
    excess = ((out - exact).abs() - bound - 1e-5 * exact.abs()).max().item()
    assert excess <= 0, f"an output is {excess:.3g} beyond the rounding bound"
    # ... and on Gaussian data the typical error is far below that worst case. Rounding errors are uniform in
    # ±s/2 (std s/√12), s ≈ 3.3σ/127 for Gaussian rows of 384: the weights' and the inputs' errors each add
    # ≈ 0.75 % of an output's std, ≈ 1.1 % together (measured 1.0 % with the bias): bounded at 1.5 %.
    relative = ((out - exact).abs().mean() / exact.abs().mean()).item()
    assert relative < 0.015, f"mean abs error {relative:.3%} of the mean output"


def test_fallback_multiplies_the_dequantized_weight():
    # Where the CPU has no int8 dot products: W8A16, exactly F.linear with the dequantized weight.
    linear = random_linear()
    codes, scale = quantize_weight(linear.weight.detach())
    layer = Int8Linear(codes, scale, linear.bias.detach(), int_mm=False)
    x = torch.randn(3, 384)
    torch.testing.assert_close(layer(x), F.linear(x, codes.float() * scale[:, None], linear.bias), rtol=0, atol=0)


def test_zero_rows_and_integer_weights_survive():
    linear = random_linear(64, 32)
    layer = Int8Linear(*quantize_weight(linear.weight.detach()), None)
    x = torch.randn(4, 64)
    x[1] = 0  # an all-zero token: scale 1, codes 0, output 0 rather than NaN
    out = layer(x)
    assert torch.isfinite(out).all() and (out[1] == 0).all()


def test_int8_linear_refuses_wrong_storage():
    with pytest.raises(ValueError, match="one fp32 scale per output channel"):
        Int8Linear(torch.zeros(4, 8, dtype=torch.int8), torch.ones(8), None)


def test_quantize_int8_swaps_the_block_products_and_keeps_the_rest():
    model = random_model()
    quantize_int8(model)
    layers = int8_layers(model)
    names = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    # The attention and MLP products of every block ...
    assert {"double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.2", "single_blocks.2.linear1",
            "single_blocks.0.linear2"} <= layers.keys()
    assert len(layers) == 2 * 2 * 4 + 3 * 2  # 2 double blocks x 2 streams x (qkv, proj, mlp.0, mlp.2) + 3 x 2
    # ... not the embedders, the final layer or the modulation.
    for kept in ("img_in", "txt_in", "time_in.in_layer", "final_layer.linear", "final_layer.adaLN_modulation.1",
                 "double_blocks.0.img_mod.lin", "single_blocks.0.modulation.lin"):
        assert kept in names and kept not in layers
    # The official key names stay; each quantized weight gains its scale beside it.
    original = set(random_model().state_dict())
    assert set(model.state_dict()) == original | {f"{name}.weight_scale" for name in layers}


@pytest.mark.parametrize("dtype, tolerance", [
    # About 1 % per layer (above), compounding through 5 blocks of real head dim 128 on this random model:
    # measured 1.6 % in fp32.
    (torch.float32, 0.02),
    # bf16 adds its own rounding to both sides (the unquantized bf16 model is 9 % off the fp32 one on these
    # random weights): measured 1.9 %.
    (torch.bfloat16, 0.03),
])
def test_quantized_model_stays_close_to_the_unquantized_one(dtype, tolerance):
    model = random_model().to(dtype)
    quantized = quantize_int8(copy.deepcopy(model))
    inputs = {k: v.to(dtype) if v is not None and v.is_floating_point() else v for k, v in tiny_inputs().items()}
    with torch.no_grad():
        exact, out = model(**inputs).double(), quantized(**inputs).double()
    relative = ((out - exact).abs().mean() / exact.abs().mean()).item()
    assert relative < tolerance, f"int8 model: mean abs error {relative:.3%} of the mean output ({dtype})"
    assert relative > 0  # the layers did change: int8 is not a no-op here


def test_pipeline_quantize_int8_on_the_builtin_model(tmp_path):
    model = builtin_model()
    exact = Pipeline.from_pretrained(model, device="cpu", dtype=torch.float32)
    quantized = Pipeline.from_pretrained(model, device="cpu", dtype=torch.float32, quantize="int8")
    assert int8_layers(quantized.model) and not int8_layers(exact.model)
    arguments = dict(width=64, height=64, num_steps=4, seed=3, output_type="pt", progress=False)
    reference, image = exact("a red circle", **arguments), quantized("a red circle", **arguments)
    # Pixels in [0, 1]; the bound for int8 is 1 % mean abs of the unquantized image (measured 0.18 %).
    error = (image - reference).abs().mean().item()
    assert 0 < error < 0.01, f"int8 image: mean abs error {error:.4f} of the unquantized image"
    with pytest.raises(ValueError, match="quantize must be None or 'int8'"):
        Pipeline.from_pretrained(model, device="cpu", dtype=torch.float32, quantize="int4")
    with pytest.raises(ValueError, match="not combined with fp8=True"):
        Pipeline.from_pretrained(model, device="cpu", dtype=torch.float32, quantize="int8", fp8=True)


def test_cli_quantize_int8(tmp_path):
    out = tmp_path / "cat.png"
    assert cli(["generate", "a cat", "--quantize", "int8", "--width", "64", "--height", "64", "--steps", "2",
                "--seed", "1", "--dtype", "fp32", "--quiet", "-o", str(out)]) == 0
    assert out.is_file()
    with pytest.raises(SystemExit):  # argparse: exit code 2 for a value not among the choices
        cli(["generate", "a cat", "--quantize", "int4"])
