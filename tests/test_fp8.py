"""fp8 weight storage (flux/weights/fp8.py), checked against references computed here from the format's definition.

e4m3fn is defined in the OCP 8-bit floating point specification: 1 sign, 4 exponent bits (bias 7), 3 mantissa
bits, subnormals below 2^-6 in steps of 2^-9, largest value 448, no infinities. The expected weights are
rounded and decoded from that definition (`round_to_e4m3`, `decode_e4m3`) or by PyTorch's own conversion,
never by flux.weights.fp8's code paths; the community fp8 layout is checked against diffusers' single-file loader.
"""

import copy
import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_loading import official_layout_weights, relative_error, run_diffusers, run_ours
from test_loading import inputs as diffusers_inputs
from test_model import MANIFESTS, random_model, tiny_inputs
from torch import nn

from flux import CheckpointError, Pipeline, load_flow_model
from flux.weights.checkpoint import read_safetensors, write_safetensors
from flux.modules.configs import TINY, configs
from flux.weights.fp8 import Fp8Linear, load_fp8_flow_model, quantize, save_fp8, to_fp8, upcast
from flux.weights.lora import add_lora, load_lora, save_lora
from flux.modules.transformer import Flux

FP8 = torch.float8_e4m3fn


def round_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """The nearest e4m3fn value (ties to even), in float64: 3 mantissa bits, so a binade [2^e, 2^(e+1)) holds 8
    steps of 2^(e-3); below 2^-6 the step stays 2^-9 (subnormals); beyond 448 it saturates."""
    x = x.double()
    _, exponent = torch.frexp(x)  # x = m · 2^exponent with 0.5 <= |m| < 1: the binade is 2^(exponent - 1)
    step = torch.pow(2.0, (exponent - 1).clamp(min=-6) - 3.0)
    return (torch.round(x / step) * step).clamp(-448, 448)  # torch.round rounds half to even


def decode_e4m3(codes: torch.Tensor) -> torch.Tensor:
    """Bytes -> their e4m3fn values, from the bit fields: (-1)^s · (1 + m/8) · 2^(e-7), or m/8 · 2^-6 for e = 0."""
    codes = codes.long()
    sign, exponent, mantissa = (codes >> 7) & 1, (codes >> 3) & 0xF, codes & 0x7
    magnitude = torch.where(exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * torch.pow(2.0, exponent - 7.0))
    return torch.where(sign == 1, -magnitude, magnitude).double()


def dequantized(linear: nn.Linear) -> torch.Tensor:
    """What an Fp8Linear's weight stands for, by PyTorch's own fp8 conversion."""
    return linear.weight.float() * linear.scale_weight


BLOCKS = ("double_blocks", "single_blocks")


def block_linears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith(BLOCKS)}


def run(model, x):
    with torch.no_grad():
        return model(**x)


def same_bytes(a, b):
    """Equal dtype, shape and stored bytes (fp8 tensors have no comparison of their own)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def rms_error(a, b):
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------------------------------
# The format: every code upcasts exactly; quantize rounds to nearest with scale max|W| / 448.
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_fp8_code_upcasts_to_its_value(dtype):
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)  # all but the two NaNs
    weight, factor = upcast(codes.reshape(2, -1).view(FP8), dtype)
    assert weight.dtype == dtype
    expected = decode_e4m3(codes).reshape(2, -1)
    assert torch.equal(weight.double() * factor, expected)
    assert torch.equal(codes.view(FP8).double(), decode_e4m3(codes))  # PyTorch's own conversion agrees


def test_quantize_rounds_each_weight_to_the_nearest_e4m3_value():
    generator = torch.Generator().manual_seed(0)
    # Gaussian weights plus a few tiny ones (e4m3's subnormals after scaling) and exact ties.
    weight = torch.randn(64, 96, generator=generator) * 0.02
    weight[0, :8] = torch.tensor([1e-7, -3e-7, 2e-6, 0.0, 5e-6, -1e-6, 4e-8, 7e-7])
    weight[1, 0] = weight.abs().max() * 1.5  # the largest weight, which must land on 448 exactly
    stored, scale = quantize(weight)
    assert stored.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == ()
    assert scale == weight.abs().max() / 448
    expected = round_to_e4m3(weight / scale)  # the division as quantize specifies it: fp32, then rounded
    assert torch.equal(stored.double(), expected)
    assert stored.float().abs().max() == 448
    # The round trip is within half a step: 2^-4 relative for normal values.
    normal = (weight / scale).abs() >= 2**-6
    relative = ((stored.float() * scale - weight).abs() / weight.abs())[normal]
    assert relative.max() <= 2**-4


def test_quantize_refuses_non_finite_weights_and_takes_scale_one_for_zero():
    with pytest.raises(ValueError, match="cannot quantize a weight holding inf"):
        quantize(torch.tensor([[1.0, float("inf")]]))
    stored, scale = quantize(torch.zeros(3, 4))
    assert scale == 1 and not stored.float().any()


# --------------------------------------------------------------------------------------------------
# The fp8 model against the same model with its weights rounded here, and against full precision.
# --------------------------------------------------------------------------------------------------

def test_fp8_model_computes_with_its_rounded_weights():
    model = random_model()
    converted = to_fp8(copy.deepcopy(model))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, linear in block_linears(reference).items():
            scale = linear.weight.abs().max() / 448
            linear.weight.copy_(round_to_e4m3(linear.weight / scale) * scale)
            assert torch.equal(converted.get_submodule(name).weight.double(), round_to_e4m3(linear.weight / scale))
    x = tiny_inputs()
    error = relative_error(run(converted, x), run(reference, x))
    assert error <= 1e-5, f"fp32 max relative error {error:.2e} against the independently rounded weights"


def test_fp8_error_against_full_precision_is_that_of_three_mantissa_bits():
    """Rounding to 3 mantissa bits moves each weight by at most 2^-4 of itself, uniformly within that, so
    a layer's output moves by at most 2^-4/√3 ≈ 3.6 % RMS (less: most weights' steps are finer than the
    worst case). Five blocks compound theirs, partly averaged by the residual streams: measured 4.2 % for
    TINY; bound 8 %. A wrong scale or a weight read transposed gives ≥ 100 %."""
    model = random_model()
    converted = to_fp8(copy.deepcopy(model))
    x = tiny_inputs()
    linear = model.single_blocks[0].linear1
    hidden = torch.randn(40, linear.in_features)
    with torch.no_grad():
        layer_error = rms_error(converted.single_blocks[0].linear1(hidden) - linear.bias, linear(hidden) - linear.bias)
    assert 0.01 <= layer_error <= 2**-4 / math.sqrt(3), f"one layer's RMS error {layer_error:.3f}"
    error = rms_error(run(converted, x), run(model, x))
    assert 0.01 <= error <= 0.08, f"whole model's RMS error {error:.3f}"


def test_converted_layers_hold_one_byte_per_weight():
    model = random_model()
    before = {name: (m.weight.numel(), m.bias.numel()) for name, m in block_linears(model).items()}
    others = sum(p.numel() for name, p in model.named_parameters()
                 if not (name.startswith(BLOCKS) and name.rpartition(".")[0] in before and name.endswith(".weight")))
    converted = to_fp8(model)
    layers = block_linears(converted)
    assert set(layers) == set(before) and all(type(m) is Fp8Linear for m in layers.values())
    for name, layer in layers.items():
        weight_count, bias_count = before[name]
        # The weight 1 byte each, the scale one fp32, the bias fp32 as before.
        assert [(t.dtype, t.numel() * t.element_size()) for t in (layer.weight, layer.scale_weight, layer.bias)] == [
            (FP8, weight_count), (torch.float32, 4), (torch.float32, 4 * bias_count)]
    total = sum(t.numel() * t.element_size() for t in [*converted.parameters(), *converted.buffers()])
    assert total == sum(w for w, _ in before.values()) + 4 * len(before) + 4 * others
    # The embedders and the final layer stay as they were.
    assert all(type(converted.get_submodule(n)) is nn.Linear for n in ("img_in", "txt_in", "final_layer.linear"))


def test_full_size_fp8_model_keeps_the_official_names():
    official = json.loads((MANIFESTS / "flux1-schnell.json").read_text())["tensors"]
    with torch.device("meta"):
        model = to_fp8(Flux(configs["flux-schnell"].params))
    names = list(model.state_dict())
    scales = [name for name in names if name.endswith(".scale_weight")]
    assert [name for name in names if name not in scales] == list(official)
    block_weights = {name for name, (shape, _) in official.items()
                     if name.startswith(BLOCKS) and name.endswith(".weight") and len(shape) == 2}
    assert {name.replace(".scale_weight", ".weight") for name in scales} == block_weights and len(scales) == 304
    stored = sum(p.numel() for p in model.parameters() if p.dtype == FP8)
    assert stored == sum(math.prod(official[name][0]) for name in block_weights) == 11_834_228_736  # 99.5 %


# --------------------------------------------------------------------------------------------------
# Files: community fp8, ComfyUI scaled fp8, official bf16; our own saved files.
# --------------------------------------------------------------------------------------------------

def test_community_fp8_file_matches_diffusers_single_file_loading(tmp_path):
    """Every tensor e4m3 and no scales, as the fp8 FLUX.1 files in circulation; diffusers' single-file converter
    (at the real width it assumes, one block of each kind) with PyTorch's fp8 -> fp32 is the reference."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    params = replace(TINY, hidden_size=3072, num_heads=24, depth=1, depth_single_blocks=1)
    path = tmp_path / "flux1-schnell-fp8-e4m3fn.safetensors"
    save_file({name: (t * 8).to(FP8) for name, t in official_layout_weights(params).items()}, path)  # ×8: fewer subnormals
    ours = load_fp8_flow_model(path, dtype=torch.float32)
    stored = load_file(path)
    for name, layer in block_linears(ours).items():  # kept as stored, scale 1
        assert same_bytes(layer.weight, stored[f"{name}.weight"]) and layer.scale_weight == 1
    with torch.device("meta"):
        reference = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=params.context_in_dim, pooled_projection_dim=params.vec_in_dim,
            guidance_embeds=False, axes_dims_rope=(16, 56, 56))
    converted = convert_flux_transformer_checkpoint_to_diffusers({k: v.float() for k, v in stored.items()})
    reference.load_state_dict(converted, strict=True, assign=True)
    del stored, converted
    x = diffusers_inputs(params, batch=1, height=4, width=3, text=5)
    error = relative_error(run_ours(ours, x), run_diffusers(reference.eval(), x))
    assert error <= 1e-5, f"fp32 max relative error {error:.2e}"


def comfy_scaled_file(path, params=TINY, *, prefix="", seed=0):
    """A file laid out as ComfyUI's scaled fp8 ones: the blocks' weights in e4m3 with a `scale_weight` each
    (alternately of shape () and (1,)), `scale_input`s, `txt_in` scaled too, everything else bf16, and the
    `scaled_fp8` marker (empty, as ComfyUI saves it). Returns the dequantized weights, by PyTorch's conversion."""
    weights = official_layout_weights(params, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    tensors, expected = {}, {}
    for index, (name, tensor) in enumerate(weights.items()):
        layer, _, leaf = name.rpartition(".")
        if leaf == "weight" and (layer.startswith(BLOCKS) or layer == "txt_in") and tensor.ndim == 2:
            scale = tensor.abs().max() / 448 * (1 + torch.rand((), generator=generator))  # not only max/448
            stored = (tensor / scale).to(FP8)
            tensors[name] = stored
            tensors[f"{layer}.scale_weight"] = scale.reshape(() if index % 2 else (1,))
            tensors[f"{layer}.scale_input"] = torch.tensor(1.0)
            expected[name] = stored.float() * scale
        else:
            tensors[name] = tensor.bfloat16()
            expected[name] = tensor.bfloat16().float()
    tensors["scaled_fp8"] = torch.empty(0, dtype=FP8)
    save_file({prefix + name: tensor for name, tensor in tensors.items()}, path)
    return expected


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_comfy_scaled_fp8_file_equals_what_its_scales_say(tmp_path, prefix):
    path = tmp_path / "flux_fp8_scaled.safetensors"
    expected = comfy_scaled_file(path, prefix=prefix)
    reference = Flux(TINY).eval()
    reference.load_state_dict(expected, strict=True)
    x = tiny_inputs()
    truth = run(reference, x)

    ours = load_fp8_flow_model(path, dtype=torch.float32)
    stored = load_file(path)
    for name, layer in block_linears(ours).items():
        assert same_bytes(layer.weight, stored[f"{prefix}{name}.weight"])
        assert torch.equal(dequantized(layer), expected[f"{name}.weight"])
    assert type(ours.txt_in) is nn.Linear and torch.equal(ours.txt_in.weight, expected["txt_in.weight"])
    assert relative_error(run(ours, x), truth) <= 1e-5

    plain = load_flow_model(path, dtype=torch.float32)  # dequantized on load
    assert all(torch.equal(plain.state_dict()[name], tensor) for name, tensor in expected.items())
    assert relative_error(run(plain, x), truth) <= 1e-5


def test_save_then_load_is_exact_and_readable_as_comfy_scaled_fp8(tmp_path):
    model = to_fp8(random_model())
    path = tmp_path / "flux1-tiny-fp8-scaled.safetensors"
    save_fp8(model, path)
    loaded = load_fp8_flow_model(path, dtype=torch.float32)
    before, after = model.state_dict(), loaded.state_dict()
    assert list(after) == list(before)
    assert all(same_bytes(a, b) for a, b in zip(after.values(), before.values()))
    x = tiny_inputs()
    assert torch.equal(run(loaded, x), run(model, x))
    # ComfyUI's convention, read with the reference safetensors reader: the marker and one scale per fp8 layer.
    with safe_open(str(path), "pt") as file:
        keys = set(file.keys())
        marker = file.get_tensor("scaled_fp8")
        assert marker.dtype == FP8 and marker.numel() == 2  # two elements: "upcast, multiply in the compute dtype"
        assert file.get_tensor("double_blocks.0.img_attn.qkv.scale_weight").shape == ()
    scales = {f"{name}.scale_weight" for name in block_linears(model)}
    assert keys == set(Flux(TINY).state_dict()) | scales | {"scaled_fp8"}


def test_official_file_is_quantized_as_it_is_read(tmp_path):
    weights = official_layout_weights(TINY)
    save_file({name: t.bfloat16() for name, t in weights.items()}, tmp_path / "flux1-tiny.safetensors")
    loaded = load_fp8_flow_model(tmp_path / "flux1-tiny.safetensors", dtype=torch.float32)
    converted = to_fp8(load_flow_model(tmp_path / "flux1-tiny.safetensors", dtype=torch.float32))
    assert list(loaded.state_dict()) == list(converted.state_dict())
    assert all(same_bytes(a, b) for a, b in zip(loaded.state_dict().values(), converted.state_dict().values()))


def test_float8_dtype_in_load_flow_model_means_fp8_blocks_and_bf16_rest(tmp_path):
    model = to_fp8(random_model())
    save_fp8(model, tmp_path / "fp8.safetensors")
    loaded = load_flow_model(tmp_path / "fp8.safetensors", dtype=FP8)
    stored = {name for name, p in loaded.named_parameters() if p.dtype == FP8}
    assert stored == {f"{name}.weight" for name in block_linears(loaded)}
    assert {p.dtype for name, p in loaded.named_parameters() if name not in stored} == {torch.bfloat16}


# --------------------------------------------------------------------------------------------------
# Errors name the file and the tensor.
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"double_blocks.7.img_attn.qkv.scale_weight": torch.tensor(1.0)},
     r"'double_blocks.7.img_attn.qkv.scale_weight' scales a layer the file does not have"),
    ({"single_blocks.0.linear9.scale_input": torch.tensor(1.0)}, r"'single_blocks.0.linear9.scale_input' scales a layer"),
    ({"single_blocks.0.linear1.scale_weight": torch.ones(3)},
     r"'single_blocks.0.linear1.scale_weight' is torch.float32 of shape \(3,\); a scale is one floating-point number"),
    ({"single_blocks.0.linear1.scale_weight": torch.tensor(float("nan"))},
     r"'single_blocks.0.linear1.scale_weight' is nan; a scale must be a finite number"),
    ({"single_blocks.0.linear1.scale_weight": torch.tensor(3)},
     r"'single_blocks.0.linear1.scale_weight' is torch.int64 of shape \(\); a scale is one floating-point number"),
    ({"double_blocks.1.txt_mlp.0.weight": 0x7F}, r"'double_blocks.1.txt_mlp.0.weight' holds fp8 NaN values"),
    ({"single_blocks.1.linear2.weight": 0xFF}, r"'single_blocks.1.linear2.weight' holds fp8 NaN values"),
])
def test_bad_scaled_files_name_the_file_and_tensor(tmp_path, change, message):
    path = tmp_path / "broken-fp8.safetensors"
    comfy_scaled_file(path)
    tensors = load_file(path)
    for name, value in change.items():
        if isinstance(value, int):  # one stored byte made one of e4m3fn's two NaN codes
            code, value = value, tensors[name].clone()
            value.view(torch.uint8)[1, 2] = code
        tensors[name] = value
    save_file(tensors, path)
    for load in (load_fp8_flow_model, load_flow_model):
        if load is load_flow_model and "NaN" in message:
            continue  # converted on load, a NaN stays a NaN: nothing hides it
        with pytest.raises(CheckpointError, match=rf"broken-fp8.safetensors: tensor {message}"):
            load(path, dtype=torch.float32)


def test_non_finite_weight_to_quantize_is_named(tmp_path):
    weights = official_layout_weights(TINY)
    weights["single_blocks.2.linear2.weight"][0, 0] = float("inf")
    save_file(weights, tmp_path / "inf.safetensors")
    with pytest.raises(CheckpointError, match=r"inf.safetensors: tensor 'single_blocks.2.linear2.weight': cannot quantize"):
        load_fp8_flow_model(tmp_path / "inf.safetensors")


# --------------------------------------------------------------------------------------------------
# LoRA, the pipeline and the command line on an fp8 transformer.
# --------------------------------------------------------------------------------------------------

def with_dequantized_weights(fp8_model, params=TINY):
    """A plain Flux computing with what `fp8_model` stores, by PyTorch's fp8 conversion."""
    state = {}
    for name, tensor in fp8_model.state_dict().items():
        if name.endswith(".scale_weight"):
            continue
        layer = name.rpartition(".")[0]
        state[name] = dequantized(fp8_model.get_submodule(layer)) if tensor.dtype == FP8 else tensor.float()
    plain = Flux(params).eval()
    plain.load_state_dict(state, strict=True)
    return plain


def test_lora_loads_onto_an_fp8_model(tmp_path):
    model = to_fp8(random_model())
    reference = with_dequantized_weights(model)
    for parameter in add_lora(reference, rank=4):
        nn.init.normal_(parameter, std=0.05)
    save_lora(reference, tmp_path / "lora.safetensors")
    changed = load_lora(model, tmp_path / "lora.safetensors")
    assert changed and all(type(model.get_submodule(name)) is Fp8Linear for name in changed)
    x = tiny_inputs()
    assert relative_error(run(model, x), run(reference, x)) <= 1e-5
    with pytest.raises(ValueError, match="carries a LoRA"):
        save_fp8(model, tmp_path / "with-lora.safetensors")


def test_pipeline_keeps_fp8_storage_and_computes_in_its_dtype(tiny_snapshot):
    pipe = Pipeline.from_pretrained(tiny_snapshot, device="cpu", dtype=torch.float32, fp8=True)
    assert pipe.dtype == torch.float32
    assert {layer.weight.dtype for layer in block_linears(pipe.model).values()} == {FP8}
    reference = Pipeline(model=with_dequantized_weights(pipe.model), ae=pipe.ae, t5=pipe.t5, clip=pipe.clip,
                         defaults=pipe.defaults, device="cpu")
    ours, theirs = (p("a red circle", height=32, width=48, seed=3, num_steps=2, output_type="latent", progress=False)
                    for p in (pipe, reference))
    assert relative_error(ours, theirs) <= 1e-5


def test_cli_fp8_flag(tiny_snapshot, tmp_path):
    from flux.cli.main import main

    out = tmp_path / "fp8.png"
    assert main(["generate", "a cat", "--model", str(tiny_snapshot), "--fp8", "--dtype", "fp32", "-o", str(out),
                 "--width", "32", "--height", "32", "--steps", "1", "--quiet"]) == 0
    assert out.is_file()


# --------------------------------------------------------------------------------------------------
# The streaming writer save_fp8 uses.
# --------------------------------------------------------------------------------------------------

def test_write_safetensors_streams_what_the_reference_reader_reads(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(4).to(FP8), "scale": torch.tensor(2.5),
               "empty": torch.zeros(0, 3, dtype=torch.bfloat16), "ids": torch.arange(3)}
    path = tmp_path / "streamed.safetensors"
    write_safetensors(path, {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}, iter(tensors.items()),
                      metadata={"format": "pt"})
    with safe_open(str(path), "pt") as file:
        assert file.metadata() == {"format": "pt"}
        assert all(same_bytes(file.get_tensor(n), t) for n, t in tensors.items())
    assert set(read_safetensors(path)) == set(tensors)
    with pytest.raises(ValueError, match=r"got tensor 'b' .* expected the layout's next, 'a'"):
        write_safetensors(tmp_path / "bad.safetensors", {"a": ((1,), torch.float32), "b": ((1,), torch.float32)},
                          [("b", torch.zeros(1))])
    with pytest.raises(ValueError, match=r"never given: 'b'"):
        write_safetensors(tmp_path / "short.safetensors", {"a": ((1,), torch.float32), "b": ((1,), torch.float32)},
                          [("a", torch.zeros(1))])
    assert not list(tmp_path.glob("bad*")) and not list(tmp_path.glob("short*"))  # nothing half-written is left
