"""Fuzzing the LoRA loader (flux/weights/lora.py's `load_lora`). The eight bugs it found are fixed; each has a
regression test in tests/test_hardening.py (`test_broken_lora_files_name_the_file`).

Seeds are LoRAs `save_lora` writes for the tiny snapshot's transformer in its three layouts (diffusers with
`.alpha` tensors, kohya, Black Forest Labs), and a PEFT-style file whose alpha lives in the
`lora_adapter_metadata` JSON of the file's metadata, as diffusers' `save_lora_adapter` writes it. A LoRA that
loads must leave a model that runs, and `unload_lora` must give the model back bit for bit.
"""

import json
import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from flux.weights.loading import load_flow_model
from flux.weights.lora import add_lora, load_lora, save_lora, unload_lora
from fuzzing import Mutant, bounded, case_folder, fuzz_settings, mutated_json_file, mutated_safetensors, outcome


@pytest.fixture(scope="module")
def lora_seeds(tiny_snapshot, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-seeds")
    model = load_flow_model(tiny_snapshot / "flux1-schnell.safetensors", dtype=torch.float32)
    torch.manual_seed(0)
    for parameter in add_lora(model, rank=4, alpha=8, targets=["double_blocks.*.img_attn.qkv", "single_blocks.0.linear1",
                                                                  "final_layer.adaLN_modulation.1"]):
        torch.nn.init.normal_(parameter, std=0.02)
    for format in ("diffusers", "kohya", "bfl"):
        save_lora(model, folder / f"{format}.safetensors", format=format)
    tensors = {k: v for k, v in load_file(folder / "diffusers.safetensors").items() if not k.endswith(".alpha")}
    config = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"norm_out.linear": 4}, "use_rslora": False, "use_dora": False}
    save_file(tensors, folder / "peft.safetensors", metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    return folder


@pytest.fixture(scope="module")
def model(tiny_snapshot):
    """The transformer LoRAs are loaded into and unloaded from."""
    return load_flow_model(tiny_snapshot / "flux1-schnell.safetensors", dtype=torch.float32)


@st.composite
def mutated_adapter_metadata(draw, blob: bytes) -> Mutant:
    """The file with its `lora_adapter_metadata` JSON (a string inside the header's __metadata__) mutated."""
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + size])
    config = json.loads(header["__metadata__"]["lora_adapter_metadata"])
    text = draw(mutated_json_file(config))
    header["__metadata__"]["lora_adapter_metadata"] = text.decode("utf-8", "replace")
    encoded = json.dumps(header).encode()
    mutant = Mutant(struct.pack("<Q", len(encoded)) + encoded + blob[8 + size :])
    mutant.edits = ("lora_adapter_metadata: " + "; ".join(text.edits),)
    return mutant


def run(model):
    generator = torch.Generator().manual_seed(0)
    p = model.params
    img_ids = torch.zeros(1, 6, 3)
    img_ids[0, :, 2] = torch.arange(6)
    return model(torch.randn(1, 6, p.in_channels, generator=generator), img_ids,
                 torch.randn(1, 5, p.context_in_dim, generator=generator), torch.zeros(1, 5, 3), torch.tensor([0.5]),
                 torch.randn(1, p.vec_in_dim, generator=generator))


@pytest.mark.parametrize("seed", ["diffusers", "kohya", "bfl", "peft"])
@given(data=st.data())
@fuzz_settings(ci_examples=20)
def test_load_lora(lora_seeds, model, tmp_path, seed, data):
    blob = (lora_seeds / f"{seed}.safetensors").read_bytes()
    mutation = mutated_adapter_metadata(blob) if seed == "peft" and data.draw(st.booleans()) else mutated_safetensors(blob)
    with case_folder(tmp_path) as folder, torch.no_grad():
        path = folder / "lora.safetensors"
        path.write_bytes(data.draw(mutation))
        before = run(model)  # here, not in the fixture: its bits depend on the thread count (see conftest.py)
        try:
            changed = outcome(lambda: load_lora(model, path), names=[path])
            if changed is not None:
                with bounded():
                    assert run(model).shape == before.shape
        finally:
            unload_lora(model)
        assert torch.equal(run(model), before), "unload_lora did not give the model back"
