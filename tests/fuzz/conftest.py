"""Seeds for the fuzz tests, built from the tiny snapshot of tests/conftest.py, and the count of cases run."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fuzzing import CASES, LONG_RUN


@pytest.fixture(autouse=True)
def one_thread():
    """The cases are tiny: one thread runs them faster than two contending ones, and spares a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sharded_transformer(tiny_snapshot, tmp_path_factory):
    """The snapshot's diffusers transformer/ folder saved as three shards and an index, as large models are."""
    folder = tmp_path_factory.mktemp("sharded") / "transformer"
    folder.mkdir()
    shutil.copy(tiny_snapshot / "transformer" / "config.json", folder)
    tensors = load_file(tiny_snapshot / "transformer" / "diffusion_pytorch_model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for index in range(3):
        shard = f"diffusion_pytorch_model-{index + 1:05d}-of-00003.safetensors"
        part = names[index::3]
        save_file({name: tensors[name] for name in part}, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


@pytest.fixture(scope="session")
def prefixed_bundle(tiny_snapshot, tmp_path_factory):
    """The transformer under ComfyUI's `model.diffusion_model.` prefix, with an autoencoder tensor beside it."""
    tensors = load_file(tiny_snapshot / "flux1-schnell.safetensors")
    bundle = {f"model.diffusion_model.{name}": tensor for name, tensor in tensors.items()}
    bundle.update({f"vae.{name}": tensor for name, tensor in list(load_file(tiny_snapshot / "ae.safetensors").items())[:4]})
    path = tmp_path_factory.mktemp("bundle") / "bundle.safetensors"
    save_file(bundle, path)
    return path


def pytest_terminal_summary(terminalreporter):
    if CASES["count"]:
        mode = f"long run, FLUX_FUZZ_EXAMPLES={LONG_RUN}" if LONG_RUN else "CI counts"
        terminalreporter.write_line(f"fuzz: {CASES['count']} cases ({mode})")
