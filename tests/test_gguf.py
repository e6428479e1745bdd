"""GGUF transformers (flux/weights/gguf.py, gguf_blocks.py, gguf_save.py), against the `gguf` package.

The independent references are llama.cpp's own Python package: its `GGUFWriter` writes the test files, its
quantizers make the legacy types' blocks (`gguf.quants.quantize`), its numpy dequantizers
(`gguf.quants.dequantize`) give the weights a reference model is loaded with, and its `GGUFReader` reads back
the files `flux quantize` writes. K-quant blocks (which the package cannot make) are random bytes whose fp16
super-block scales are set to small finite values, the sub-block scales and integers left random: every bit
of the layout is exercised.
"""

from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from test_loading import relative_error
from test_model import random_model, tiny_inputs

from flux import CheckpointError, Pipeline, load_flow_model
from flux.modules.configs import TINY
from flux.modules.transformer import Flux
from flux.weights.checkpoint import write_safetensors
from flux.weights.gguf import GgufLinear, gguf_layers, read_gguf
from flux.weights.gguf_blocks import TYPES

# Head dim 128 and the rotary axes (16, 56, 56) as FLUX.1; width 256 so that every Linear's rows (256, 1280)
# split into the K-quants' 256-weight blocks.
# One block of each kind keeps the tests fast on a shared machine; the loader's block handling is indexed, not
# counted, and tests/test_loading.py covers depths.
PARAMS = replace(TINY, hidden_size=256, num_heads=2, guidance_embed=True, depth=1, depth_single_blocks=1)
QUANTIZED = ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]
K_QUANTS = {"Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"}
# Where each type's fp16 scales sit in its block (ggml-common.h's block_* structs): set to small finite
# values in the random K-quant blocks.
FP16_FIELDS = {"Q6_K": [208], "Q5_K": [0, 2], "Q4_K": [0, 2], "Q3_K": [108], "Q2_K": [80, 82]}
# Bits per weight of each type, from its block: bytes · 8 / weights (Q4_0: 18 bytes for 32 weights).
BITS = {"Q8_0": 8.5, "Q5_1": 6.0, "Q5_0": 5.5, "Q4_1": 5.0, "Q4_0": 4.5, "Q6_K": 6.5625, "Q5_K": 5.5,
        "Q4_K": 4.5, "Q3_K": 3.4375, "Q2_K": 2.625}
# Every forward is compared in fp32. Ours and the reference multiply identical fp32 weights (our dequantizers
# are exact: a few products of small integers and fp16 values) with the same kernels, so the bound only covers
# a different summation order should torch pick another GEMM path for a (byte-)buffer-backed layer.
TOLERANCE = 1e-5


def in_blocks(name: str) -> bool:
    return name.startswith(("double_blocks.", "single_blocks.")) and name.endswith(".weight")


def encode(name: str, tensor: torch.Tensor, kind: str, rng) -> np.ndarray:
    """A tensor's bytes in GGUF type `kind`: quantized by the gguf package, or random K-quant blocks."""
    values = tensor.detach().float().numpy()
    if kind not in K_QUANTS:
        return gguf.quants.quantize(values, T[kind])
    block_bytes = TYPES[kind].bytes
    blocks = rng.integers(0, 256, (values.size // 256, block_bytes), dtype=np.uint8)
    for start in FP16_FIELDS[kind]:
        scales = rng.uniform(-2e-3, 2e-3, blocks.shape[0]).astype(np.float16)
        blocks[:, start:start + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(values.shape[0], -1)


def write_file(path, model: Flux, kind: str, *, prefix="", architecture="flux", seed=0) -> dict[str, torch.Tensor]:
    """`model` as a GGUF file with its blocks' 2-D weights in `kind`, the rest F32, written by gguf's own writer;
    returns the reference state dict: every tensor as `gguf.quants.dequantize` reads the bytes written."""
    rng = np.random.default_rng(seed)
    # No architecture, as stable-diffusion.cpp writes: the writer adds no general.architecture for an empty one.
    writer = gguf.GGUFWriter(path, arch=architecture or "")
    reference = {}
    for name, tensor in model.state_dict().items():
        chosen = kind if in_blocks(name) and tensor.ndim == 2 else "F32"
        data = encode(name, tensor, chosen, rng)
        writer.add_tensor(prefix + name, data, raw_dtype=T[chosen])
        reference[name] = torch.from_numpy(gguf.quants.dequantize(data, T[chosen]).copy()).reshape(tensor.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


def reference_model(state_dict) -> Flux:
    model = Flux(PARAMS).eval()
    model.load_state_dict(state_dict)
    return model


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)


@pytest.mark.parametrize("kind", QUANTIZED + ["F32", "F16", "BF16"])
def test_every_type_matches_gguf_dequantize(kind, tmp_path):
    path = tmp_path / f"tiny-{kind}.gguf"
    reference = write_file(path, random_model(PARAMS), kind)
    ours = load_flow_model(path, dtype=torch.float32)
    layers = gguf_layers(ours)
    if kind in TYPES and TYPES[kind].quantized:
        # Every 2-D weight of the blocks is kept quantized, in the file's type, as uint8 blocks.
        expected = {name.removesuffix(".weight") for name, t in reference.items() if in_blocks(name) and t.ndim == 2}
        assert set(layers) == expected and {layer.kind.name for layer in layers.values()} == {kind}
        assert all(layer.weight.dtype == torch.uint8 for layer in layers.values())
    else:
        assert not layers
    inputs = tiny_inputs(params=PARAMS)
    error = relative_error(forward(ours, inputs), forward(reference_model(reference), inputs))
    assert error <= TOLERANCE, f"{kind}: relative error {error:.2e}"


@pytest.mark.parametrize("kind", QUANTIZED)
def test_bytes_held_match_the_format(kind, tmp_path):
    path = tmp_path / f"tiny-{kind}.gguf"
    write_file(path, random_model(PARAMS), kind)
    model = load_flow_model(path, dtype=torch.bfloat16)
    layers = gguf_layers(model)
    held = sum(layer.weight.numel() for layer in layers.values())  # uint8: one byte each
    weights = sum(layer.in_features * layer.out_features for layer in layers.values())
    assert 8 * held / weights == pytest.approx(BITS[kind], abs=1e-9)
    # And no dequantized copy is kept anywhere: the blocks' only 2-D tensors are those uint8 buffers.
    copies = [name for name, t in model.state_dict().items() if in_blocks(name) and t.ndim == 2 and t.dtype != torch.uint8]
    assert not copies, copies


def test_state_dict_and_to_see_the_blocks(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_file(path, random_model(PARAMS), "Q4_0")
    model = load_flow_model(path, dtype=torch.float32)
    state = model.state_dict()
    assert state["double_blocks.0.img_attn.qkv.weight"].dtype == torch.uint8
    moved = model.to(torch.float64)  # a float cast leaves the uint8 blocks alone, unlike fp8
    assert moved.double_blocks[0].img_attn.qkv.weight.dtype == torch.uint8
    assert moved.double_blocks[0].img_attn.qkv.bias.dtype == torch.float64


def test_bf16_compute(tmp_path):
    """In bf16 the weights are dequantized in fp32 and rounded once to bf16; the reference holds the same
    weights rounded to bf16. Both then run the same bf16 kernels: equal up to bf16's rounding of the
    activations, which differs in no op between the two (the bound covers kernels that accumulate differently)."""
    path = tmp_path / "tiny.gguf"
    reference = write_file(path, random_model(PARAMS), "Q5_K")
    ours = load_flow_model(path, dtype=torch.bfloat16)
    theirs = reference_model(reference).to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if v is not None and v.is_floating_point() else v
              for k, v in tiny_inputs(params=PARAMS).items()}
    error = relative_error(forward(ours, inputs), forward(theirs, inputs))
    assert error <= 1e-2, error


@pytest.mark.parametrize("prefix, architecture", [("model.diffusion_model.", None), ("model.diffusion_model.", "flux")],
                         ids=["stable-diffusion.cpp", "prefixed"])
def test_prefixed_files_and_no_architecture(prefix, architecture, tmp_path):
    path = tmp_path / "sdcpp.gguf"
    reference = write_file(path, random_model(PARAMS), "Q8_0", prefix=prefix, architecture=architecture)
    metadata, _ = read_gguf(path)
    assert ("general.architecture" in metadata) == (architecture is not None)
    inputs = tiny_inputs(params=PARAMS)
    error = relative_error(forward(load_flow_model(path, dtype=torch.float32), inputs),
                           forward(reference_model(reference), inputs))
    assert error <= TOLERANCE


def test_flux_quantize_round_trip(tmp_path):
    """`flux quantize` from a safetensors file; the file read back by gguf's own GGUFReader as the reference."""
    from flux.cli.main import main

    model = random_model(PARAMS)
    source = tmp_path / "flux1-tiny.safetensors"
    state = model.state_dict()
    write_safetensors(source, {n: (tuple(t.shape), t.dtype) for n, t in state.items()}, state.items())
    for kind in ["Q8_0", "Q4_0", "F16"]:  # the other types take the same path, each with gguf's quantizer
        out = tmp_path / f"tiny-{kind}.gguf"
        assert main(["quantize", str(source), str(out), "--type", kind, "--quiet"]) == 0
        reader = gguf.GGUFReader(out)
        assert reader.get_field("general.architecture").contents() == "flux"
        reference, types = {}, {}
        for tensor in reader.tensors:
            shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims innermost first
            reference[tensor.name] = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy()).reshape(shape)
            types[tensor.name] = tensor.tensor_type.name
        # The conventions: the blocks' 2-D weights in the type, everything else (1-D, embedders, final layer) F32.
        assert {types[n] for n in types if in_blocks(n) and reference[n].ndim == 2} == {kind}
        assert {types[n] for n in types if not (in_blocks(n) and reference[n].ndim == 2)} == {"F32"}
        inputs = tiny_inputs(params=PARAMS)
        ours = load_flow_model(out, dtype=torch.float32)
        error = relative_error(forward(ours, inputs), forward(reference_model(reference), inputs))
        assert error <= TOLERANCE, f"{kind}: {error:.2e}"
        # The quantization itself: within what the type's step allows of the original (Q4_0: 16 levels).
        drift = relative_error(forward(ours, inputs), forward(model, inputs))
        assert drift <= {"Q8_0": 0.02, "Q4_0": 0.3, "F16": 0.002}[kind], f"{kind}: {drift}"
    # GGUF in, GGUF out: re-quantizing a Q8_0 file to Q8_0 gives the same weights back (a fixed point of
    # round-to-nearest with the same scales).
    again = tmp_path / "again.gguf"
    assert main(["quantize", str(tmp_path / "tiny-Q8_0.gguf"), str(again), "--type", "Q8_0", "--quiet"]) == 0
    first, second = (gguf_layers(load_flow_model(p, dtype=torch.float32)) for p in (tmp_path / "tiny-Q8_0.gguf", again))
    assert all(torch.equal(first[n].dequantize(torch.float32), second[n].dequantize(torch.float32)) for n in first)


def test_pipeline_and_cli_take_a_gguf_transformer(tiny_snapshot, tmp_path):
    """The snapshot's own transformer quantized to Q8_0, then used by `Pipeline.from_pretrained(transformer=)`;
    against a pipeline whose transformer holds gguf's dequantization of the same file."""
    from flux.cli.main import main

    path = tmp_path / "schnell-Q8_0.gguf"
    assert main(["quantize", str(tiny_snapshot / "flux1-schnell.safetensors"), str(path), "--type", "Q8_0", "--quiet"]) == 0
    pipe = Pipeline.from_pretrained(tiny_snapshot, device="cpu", dtype=torch.float32, transformer=path)
    assert gguf_layers(pipe.model)
    reader = gguf.GGUFReader(path)
    reference_state = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(
        tuple(int(n) for n in reversed(t.shape))) for t in reader.tensors}
    plain = Flux(pipe.model.params).eval()
    plain.load_state_dict(reference_state)
    reference = Pipeline(model=plain, ae=pipe.ae, t5=pipe.t5, clip=pipe.clip, defaults=pipe.defaults, device="cpu")
    ours, theirs = (p("a red circle", height=32, width=48, seed=3, num_steps=2, output_type="latent", progress=False)
                    for p in (pipe, reference))
    assert relative_error(ours, theirs) <= TOLERANCE
    out = tmp_path / "gguf.png"
    assert main(["generate", "a cat", "--model", str(tiny_snapshot), "--transformer", str(path), "--dtype", "fp32",
                 "--steps", "1", "--width", "32", "--height", "32", "-o", str(out), "--quiet"]) == 0
    assert out.is_file()
    with pytest.raises(ValueError, match="keeps its own quantization"):
        Pipeline.from_pretrained(tiny_snapshot, device="cpu", fp8=True, transformer=path)


# --------------------------------------------------------------------------------------------------
# Errors: a CheckpointError naming the file (and the tensor), before anything heavy
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.gguf"
    write_file(path, random_model(PARAMS), "Q4_0")
    return path


def test_truncated_and_wrong_magic(good_file, tmp_path):
    blob = good_file.read_bytes()
    header_end = gguf.GGUFReader(good_file).data_offset
    for size, message in [(10, "shorter than a GGUF header"), (100, r"declares \d+ tensors .* more than its 100 bytes"),
                          (header_end - 40, "the header ends past the end of the file"),
                          (len(blob) - 100, "run past the end of the file")]:
        path = tmp_path / f"cut-{size}.gguf"
        path.write_bytes(blob[:size])
        with pytest.raises(CheckpointError, match=message) as error:
            load_flow_model(path)
        assert str(path) in str(error.value)
    path = tmp_path / "magic.gguf"
    path.write_bytes(b"GGUG" + blob[4:])
    with pytest.raises(CheckpointError, match="does not start with 'GGUF'"):
        load_flow_model(path)


def test_unknown_type_names_the_tensor(tmp_path):
    path = tmp_path / "iq4.gguf"
    writer = gguf.GGUFWriter(path, arch="flux")
    writer.add_tensor_info("img_in.weight", (256, 64), np.float32, 256 * 64 // 32 * 18, raw_dtype=T.IQ4_NL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.write_tensor_data(np.zeros(256 * 64 // 32 * 18, dtype=np.uint8))
    writer.close()
    with pytest.raises(CheckpointError, match=r"tensor 'img_in.weight'.*IQ4_NL, which flux does not read"):
        load_flow_model(path)


def test_shape_that_does_not_fit_names_the_tensor(tmp_path):
    model = random_model(PARAMS)
    state = model.state_dict()
    state["double_blocks.0.img_mlp.2.weight"] = state["double_blocks.0.img_mlp.2.weight"][:, :512]
    path = tmp_path / "shape.gguf"
    writer = gguf.GGUFWriter(path, arch="flux")
    for name, tensor in state.items():
        writer.add_tensor(name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"tensor 'double_blocks.0.img_mlp.2.weight' has shape \[256, 512\]"):
        load_flow_model(path)


def test_another_architecture(tmp_path):
    path = tmp_path / "llama.gguf"
    write_file(path, random_model(PARAMS), "Q8_0", architecture="llama")
    with pytest.raises(CheckpointError, match="general.architecture is 'llama', not 'flux'"):
        load_flow_model(path)


def test_not_a_transformer(tmp_path):
    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(path, arch="flux")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="not a FLUX transformer"):
        load_flow_model(path)


def test_writing_without_the_gguf_package(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "gguf" else real_import(name, *a, **k))
    from flux.weights.gguf_save import save_gguf

    with pytest.raises(ImportError, match=r"pip install 'flux\[gguf\]'"):
        save_gguf(random_model(PARAMS), tmp_path / "x.gguf", type="Q8_0")


def test_gguf_linear_refuses_bad_blocks():
    with pytest.raises(ValueError, match="uint8 Q4_0 blocks for 64 inputs"):
        GgufLinear(torch.zeros(4, 37, dtype=torch.uint8), TYPES["Q4_0"], in_features=64, bias=None)
