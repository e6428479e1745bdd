"""Fuzzing flux/weights/gguf.py: `read_gguf` and `load_flow_model` on mutated GGUF files.

Seeds: a tiny transformer (head dim 128) whose blocks' weights cycle through every quantized type flux reads,
its embedders in Q8_0, F16 and BF16, with metadata arrays (strings, integers, an array of arrays) and a
non-default alignment; and the same under stable-diffusion.cpp's conventions (a `model.diffusion_model.`
prefix, no general.architecture). The oracle for a file we accept is the gguf package (llama.cpp's own
reader, an independent parser): it must read the file too, with the same types, shapes and bytes, and the
loaded model must hold exactly those bytes, or gguf's dequantization of them.
"""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from hypothesis import given
from hypothesis import strategies as st
from test_gguf import PARAMS, QUANTIZED, encode, in_blocks
from test_model import random_model

from flux.weights.gguf import GgufLinear, read_gguf
from flux.weights.loading import load_flow_model
from fuzzing import case_folder, fuzz_settings, mutated_gguf, outcome

EMBEDDER_TYPES = {"img_in.weight": "Q8_0", "txt_in.weight": "F16", "vector_in.in_layer.weight": "BF16"}


def write_seed(path, *, prefix: str, architecture: str) -> None:
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, arch=architecture)
    writer.add_custom_alignment(64)
    writer.add_array("test.strings", ["a", "bc", ""])
    writer.add_array("test.integers", [1, 2, 3])
    writer.add_key_value("test.nested", [[1, 2], [3]], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.ARRAY)
    block_weights = 0
    for name, tensor in random_model(PARAMS).state_dict().items():
        if in_blocks(name) and tensor.ndim == 2:
            kind, block_weights = QUANTIZED[block_weights % len(QUANTIZED)], block_weights + 1
        else:
            kind = EMBEDDER_TYPES.get(name, "F32")
        writer.add_tensor(prefix + name, encode(name, tensor, kind, rng), raw_dtype=T[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="session")
def gguf_seeds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf-seeds")
    seeds = {"mixed": folder / "mixed.gguf", "stable-diffusion.cpp": folder / "sdcpp.gguf"}
    write_seed(seeds["mixed"], prefix="", architecture="flux")
    write_seed(seeds["stable-diffusion.cpp"], prefix="model.diffusion_model.", architecture="")
    return seeds


def reference_read(path) -> dict:
    """{name: (type name, torch shape, raw bytes)} as gguf's GGUFReader reads the file; it must accept it."""
    try:
        reader = gguf.GGUFReader(path)
        return {t.name: (t.tensor_type.name, tuple(int(n) for n in reversed(t.shape)), t.data) for t in reader.tensors}
    except Exception as error:  # noqa: BLE001 - any refusal of a file we accepted is the failure
        raise AssertionError(f"we read {path.name}, which gguf's GGUFReader refuses: {error!r}") from None


def raw_bytes(data) -> bytes:
    return np.ascontiguousarray(data).view(np.uint8).tobytes()


@pytest.mark.parametrize("seed", ["mixed", "stable-diffusion.cpp"])
@given(data=st.data())
@fuzz_settings(ci_examples=40)
def test_gguf_files(gguf_seeds, tmp_path, seed, data):
    blob = data.draw(mutated_gguf(gguf_seeds[seed].read_bytes()))
    with case_folder(tmp_path) as folder:
        path = folder / "model.gguf"
        path.write_bytes(blob)
        read = outcome(lambda: read_gguf(path), names=[path])
        if read is not None:
            theirs = reference_read(path)
            assert read[1].keys() == theirs.keys()
            for name, tensor in read[1].items():
                kind, shape, raw = theirs[name]
                assert (tensor.kind.name, tensor.shape) == (kind, shape), name
                assert tensor.data.contiguous().view(torch.uint8).numpy().tobytes() == raw_bytes(raw), name
        model = outcome(lambda: load_flow_model(path, dtype=torch.float32), names=[path])
        if model is not None:
            theirs = reference_read(path)
            prefix = next(n for n in theirs if n.endswith("img_in.weight")).removesuffix("img_in.weight")
            layers = {name: m for name, m in model.named_modules() if isinstance(m, GgufLinear)}
            for name, tensor in model.state_dict().items():
                kind, shape, raw = theirs[prefix + name]
                if name.removesuffix(".weight") in layers and name.endswith(".weight"):
                    assert tensor.numpy().tobytes() == raw_bytes(raw), name
                else:
                    expected = torch.from_numpy(gguf.quants.dequantize(raw, T[kind]).astype(np.float32)).reshape(shape)
                    # Exactly, NaN for NaN: a type changed by an edit reads other bytes as values, NaN among them.
                    torch.testing.assert_close(tensor, expected, rtol=0, atol=0, equal_nan=True, msg=name)
