"""Fuzzing flux/weights/checkpoint.py and the transformer and autoencoder loaders of flux/weights/loading.py.

Seeds are the tiny snapshot's own files: the official single files (flux1-schnell.safetensors, ae.safetensors),
a ComfyUI-style prefixed bundle, the diffusers folders (transformer/, vae/) and a sharded copy of transformer/.
The oracle for a file we accept is the safetensors library (an independent parser): it must accept the file
too and read the same bytes; the loaded model must hold exactly those tensors.
"""

import json
import os
import shutil

import pytest
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st

from flux.weights.checkpoint import read_safetensors
from flux.weights.layouts import autoencoder_official_names, to_official_names
from flux.weights.loading import load_autoencoder, load_flow_model
from fuzzing import case_folder, fuzz_settings, mutated_json_file, mutated_safetensors, odd_values, outcome


def reference_read(path) -> dict[str, torch.Tensor] | None:
    """The safetensors library's reading of a file, or None when it refuses it. From the bytes: the library
    takes only UTF-8 paths, and our files may have non-UTF-8 names."""
    if not path.is_file():
        return None
    try:
        return safetensors.torch.load(path.read_bytes())
    except Exception:  # noqa: BLE001 - SafetensorError
        return None


def accepted_by_reference(path) -> dict[str, torch.Tensor]:
    tensors = reference_read(path)
    assert tensors is not None, f"we read {path.name}, which the safetensors library refuses"
    return tensors


def same_bytes(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Equal dtype, shape and bits (NaN payloads included)."""
    if ours.dtype != theirs.dtype or ours.shape != theirs.shape:
        return False
    return torch.equal(ours.contiguous().reshape(-1).view(torch.uint8), theirs.contiguous().reshape(-1).view(torch.uint8))


def assert_model_holds(model, reference: dict[str, torch.Tensor]):
    for name, tensor in model.state_dict().items():
        assert same_bytes(tensor, reference[name].to(tensor.dtype)), f"{name} differs from the file's tensor"


@pytest.mark.parametrize("seed", ["ae.safetensors", "text_encoder/model.safetensors", "text_encoder_2/model.safetensors"])
@given(data=st.data())
@fuzz_settings(ci_examples=40)
def test_read_safetensors(tiny_snapshot, tmp_path, seed, data):
    blob = data.draw(mutated_safetensors((tiny_snapshot / seed).read_bytes()))
    with case_folder(tmp_path) as folder:
        path = folder / "model.safetensors"
        path.write_bytes(blob)
        ours = outcome(lambda: read_safetensors(path), names=[path])
        if ours is not None:
            theirs = accepted_by_reference(path)
            assert ours.keys() == theirs.keys()
            assert all(same_bytes(ours[name], theirs[name]) for name in ours)


LOADERS = {
    "official": ("flux1-schnell.safetensors", load_flow_model, to_official_names),
    "autoencoder": ("ae.safetensors", load_autoencoder, autoencoder_official_names),
}


@pytest.mark.parametrize("layout", [*LOADERS, "prefixed"])
@given(data=st.data())
@fuzz_settings(ci_examples=10)
def test_single_files(tiny_snapshot, prefixed_bundle, tmp_path, layout, data):
    name, loader, names = LOADERS["official" if layout == "prefixed" else layout]
    seed = prefixed_bundle if layout == "prefixed" else tiny_snapshot / name
    blob = data.draw(mutated_safetensors(seed.read_bytes()))
    with case_folder(tmp_path) as folder:
        path = folder / seed.name
        path.write_bytes(blob)
        model = outcome(lambda: loader(path, dtype=torch.float32), names=[path])
        if model is not None:
            assert_model_holds(model, names(accepted_by_reference(path), source=path))


@pytest.mark.parametrize("component", ["transformer", "vae"])
@given(data=st.data())
@fuzz_settings(ci_examples=10)
def test_diffusers_folders(tiny_snapshot, tmp_path, component, data):
    """config.json edited (the vae's is read: scale and shift, and its sizes checked against the weights), and
    the weights file mutated."""
    with case_folder(tmp_path) as root:
        folder = shutil.copytree(tiny_snapshot / component, root / component)
        config = json.loads((folder / "config.json").read_text())
        if data.draw(st.booleans()):
            (folder / "config.json").write_bytes(data.draw(mutated_json_file(config)))
        weights = folder / "diffusion_pytorch_model.safetensors"
        if data.draw(st.booleans()):
            weights.write_bytes(data.draw(mutated_safetensors(weights.read_bytes())))
        loader, names = (load_flow_model, to_official_names) if component == "transformer" else (load_autoencoder, autoencoder_official_names)
        model = outcome(lambda: loader(folder, dtype=torch.float32), names=[folder])
        if model is not None:
            assert_model_holds(model, names(accepted_by_reference(weights), source=folder))
            if component == "vae":
                scale, shift = model.params.scale_factor, model.params.shift_factor
                assert isinstance(scale, float) and isinstance(shift, float) and abs(scale) + abs(shift) < float("inf")


SYMLINK_TARGETS = ["another shard", "a copy outside", "garbage outside", "/dev/zero", "a folder", "nowhere", "itself"]
ODD_SHARD_NAMES = ["../{}", "{folder}/{}", "./{}", "sub/../{}", ".", "", "{}\0", "\udcff.safetensors", "../../../../../../etc/passwd"]


@given(data=st.data())
@fuzz_settings(ci_examples=25)
def test_sharded_index(sharded_transformer, tmp_path, data):
    """The index edited (entries pointing at other shards, outside the folder, at odd names), shards replaced by
    symlinks (to each other, out of the folder, to devices, nowhere), renamed to non-UTF-8 names, or mutated."""
    with case_folder(tmp_path) as root:
        folder = shutil.copytree(sharded_transformer, root / "transformer")
        index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        shards = sorted(set(weight_map.values()))
        for _ in range(data.draw(st.integers(1, 3))):
            edit = data.draw(st.sampled_from(["entry", "entry", "symlink", "rename", "shard bytes"]))
            shard = data.draw(st.sampled_from(shards))
            if edit == "entry":
                tensor = data.draw(st.sampled_from(sorted(weight_map)))
                weight_map[tensor] = data.draw(st.one_of(st.sampled_from(shards), odd_values, st.sampled_from(
                    [name.format(shard, folder=folder) for name in ODD_SHARD_NAMES])))
            elif edit == "symlink" and (folder / shard).exists():
                target = data.draw(st.sampled_from(SYMLINK_TARGETS))
                outside = root / f"outside-{len(list(root.glob('outside-*')))}.safetensors"  # a new one each time
                if target == "a copy outside":
                    shutil.copy(folder / shard, outside)
                elif target == "garbage outside":
                    outside.write_bytes(os.urandom(64))
                destination = {"another shard": folder / data.draw(st.sampled_from(shards)), "a copy outside": outside,
                               "garbage outside": outside, "/dev/zero": "/dev/zero", "a folder": root,
                               "nowhere": root / "nowhere", "itself": folder / shard}[target]
                (folder / shard).unlink()
                (folder / shard).symlink_to(destination)
            elif edit == "rename" and (folder / shard).exists():
                new_name = os.fsdecode(b"\xff\xfe-" + os.fsencode(shard))  # not UTF-8: '\udcff\udcfe-...' in Python
                (folder / shard).rename(folder / new_name)
                weight_map.update({k: new_name for k, v in weight_map.items() if v == shard})
            elif edit == "shard bytes" and (folder / shard).is_file() and not (folder / shard).is_symlink():
                (folder / shard).write_bytes(data.draw(mutated_safetensors((folder / shard).read_bytes())))
        if data.draw(st.integers(0, 3)) == 0:
            index_path.write_bytes(data.draw(mutated_json_file(index)))
        else:
            index_path.write_text(json.dumps(index))

        model = outcome(lambda: load_flow_model(folder, dtype=torch.float32), names=[folder])
        if model is not None:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            reference = {name: accepted_by_reference(folder / shard)[name] for name, shard in weight_map.items()}
            assert_model_holds(model, to_official_names(reference, source=folder))
