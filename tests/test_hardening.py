"""Hardening: files from strangers, hostile user input, determinism and fp16 safety (docs/hardening.md).

The fuzz suite (tests/fuzz/) mutates files at random; the file cases here are the failures it found, written
out by hand as regressions, with the safetensors library as the independent oracle where there is one. Then
the user's inputs to the pipeline, the determinism the documentation promises (with the batch-versus-alone
differences it states), and fp16: a whole generation finite, each guard needed, diffusers' clamp matched.
"""

import copy
import json
import logging
import os
import re
import shutil
import struct
import time

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file
from tokenizers import models

import flux.modules.transformer
import flux.pipelines.pipeline
from flux.weights.checkpoint import CheckpointError, read_safetensors, read_weights
from flux.weights.loading import load_autoencoder, load_clip, load_flow_model, load_t5
from flux.weights.lora import load_lora
from flux.pipelines.pipeline import Pipeline
from flux.pipelines.requests import activation_bytes
from flux.pipelines.snapshots import sampling_defaults
from flux.pipelines.sampling import get_noise
from flux.weights.tokenizers import CLIPTokenizer, T5Tokenizer

diffusers = pytest.importorskip("diffusers")


# --------------------------------------------------------------------------------------------------
# Files: the failures the fuzz suite found, each ending now in a CheckpointError that names the file
# --------------------------------------------------------------------------------------------------

def safetensors_bytes(header, data: bytes = b"") -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def entry(begin, end, shape=(1,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def reference_accepts(blob: bytes) -> bool:
    try:
        safetensors.torch.load(blob)
        return True
    except Exception:  # noqa: BLE001 - SafetensorError
        return False


HOSTILE_HEADERS = {  # header, data, what the error says; the safetensors library refuses every one of them
    "a 5000-digit number": (b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}', b"\0" * 4,
                            "its header is not JSON"),
    "nested 100 000 deep": (b"[" * 100_000 + b"]" * 100_000, b"", "its header is not JSON"),
    "a dtype that is no string": ({"a": {**entry(0, 4), "dtype": {"F32": 1}}}, b"\0" * 4, "unsupported dtype"),
    "two tensors on the same bytes": ({"a": entry(0, 4), "b": entry(0, 4)}, b"\0" * 4, "starts at data byte 0, expected 4"),
    "a gap between tensors": ({"a": entry(0, 4), "b": entry(8, 12)}, b"\0" * 12, "starts at data byte 8, expected 4"),
    "bytes after the last tensor": ({"a": entry(0, 4)}, b"\0" * 8, "its tensors fill 4 of its 8 data bytes"),
    "metadata that is no map of strings": ({"__metadata__": {"x": 1}, "a": entry(0, 4)}, b"\0" * 4, "malformed __metadata__"),
    "a name with a lone surrogate": (b'{"\\udcff": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4,
                                     "its header is not JSON"),
    "a NaN in the header": (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": NaN}}', b"\0" * 4,
                            "its header is not JSON"),
}


@pytest.mark.parametrize("case", HOSTILE_HEADERS)
def test_hostile_safetensors_headers_are_refused_by_name(tmp_path, case):
    header, data, message = HOSTILE_HEADERS[case]
    blob = safetensors_bytes(header, data)
    assert not reference_accepts(blob), "the safetensors library refuses these files too"
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
        read_safetensors(path)


def peak_growth(call) -> tuple[int, float]:
    """Bytes the process's peak memory grew by, and seconds, while `call()` ran."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets the peak (VmHWM) to the current size
    start, began = _status("VmRSS"), time.perf_counter()
    call()
    return _status("VmHWM") - start, time.perf_counter() - began


def _status(key: str) -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith(key + ":")).split()[1]) * 1024


HUGE_DECLARATIONS = {
    "a 1 TB tensor": ({"a": entry(0, 2**40, shape=(2**38,))}, "do not fit shape"),
    "a 2⁶³-byte header": (None, "declares a 9223372036854775808-byte header"),
    "an empty tensor of 2¹²⁴ elements": ({"a": entry(0, 0, shape=(0, 2**62, 2**62))}, "too large for any tensor"),
}


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads Linux's /proc")
@pytest.mark.parametrize("case", HUGE_DECLARATIONS)
def test_huge_declared_sizes_fail_fast_without_allocating(tmp_path, case):
    header, message = HUGE_DECLARATIONS[case]
    path = tmp_path / "huge.safetensors"
    path.write_bytes(safetensors_bytes(header, b"\0" * 16) if header else struct.pack("<Q", 2**63) + b"{}")

    def read():
        with pytest.raises(CheckpointError, match=re.escape(message)):
            read_safetensors(path)

    grown, seconds = peak_growth(read)
    assert grown < 64 * 2**20 and seconds < 2, f"grew by {grown / 2**20:.0f} MiB in {seconds:.1f} s"


def split_into_shards(source, folder, stem, count=2) -> None:
    """`source`'s tensors as `count` shards and an index in `folder`, as large repositories hold them."""
    tensors = load_file(source)
    names = sorted(tensors)
    weight_map = {}
    for index in range(count):
        shard = f"{stem}-{index + 1:05d}-of-{count:05d}.safetensors"
        save_file({name: tensors[name] for name in names[index::count]}, folder / shard)
        weight_map.update(dict.fromkeys(names[index::count], shard))
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_files_in_the_hugging_face_cache_load(tiny_snapshot, tmp_path):
    """The cache keeps every file once in blobs/ and links it into snapshots/<revision>/: shards resolve outside
    their index's folder, which the shard check refused (so FLUX.1's sharded T5 did not load from the cache)."""
    plain = tmp_path / "plain"
    shutil.copytree(tiny_snapshot / "tokenizer_2", plain / "tokenizer_2")
    (plain / "text_encoder_2").mkdir()
    shutil.copy(tiny_snapshot / "text_encoder_2" / "config.json", plain / "text_encoder_2")
    split_into_shards(tiny_snapshot / "text_encoder_2" / "model.safetensors", plain / "text_encoder_2", "model")
    repo = tmp_path / "hub" / "models--google--t5-tiny"
    (repo / "blobs").mkdir(parents=True)
    for number, file in enumerate(sorted(p for p in plain.rglob("*") if p.is_file())):
        blob = repo / "blobs" / f"{number:064x}"
        shutil.copy(file, blob)
        link = repo / "snapshots" / "abc123" / file.relative_to(plain)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))  # relative, as the cache writes them
    cached = load_t5(repo / "snapshots" / "abc123", dtype=torch.float32)
    direct = load_t5(plain, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(cached.state_dict().values(), direct.state_dict().values()))


@pytest.mark.parametrize("name", ["", "..", "model-00001-of-00002.safetensors\0", "sub/model.safetensors"])
def test_shard_names_that_are_not_files_beside_the_index(tiny_snapshot, tmp_path, name):
    split_into_shards(tiny_snapshot / "text_encoder_2" / "model.safetensors", tmp_path, "model")
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["shared.weight"] = name
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(f"{index_path}: shard {name!r} is outside the index's folder")):
        read_weights(tmp_path, "model")


def test_a_shard_linked_to_a_file_that_is_no_safetensors(tiny_snapshot, tmp_path):
    split_into_shards(tiny_snapshot / "text_encoder_2" / "model.safetensors", tmp_path, "model")
    shard = tmp_path / "model-00002-of-00002.safetensors"
    shard.unlink()
    shard.symlink_to(tiny_snapshot / "model_index.json")  # followed, as the cache's links are, then refused
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: not a safetensors file")):
        read_weights(tmp_path, "model")


@pytest.mark.parametrize("key, message", [
    ("double_blocks.999999999.img_mod.lin.weight", r"double_blocks are not numbered 0..999999999: missing \[2, 3, 4, 5, 6, 7, 8, 9\]"),
    ("double_blocks." + "9" * 5000 + ".img_mod.lin.weight", r"1 unexpected tensor"),
])
def test_block_numbers_far_beyond_the_blocks(tiny_snapshot, tmp_path, key, message):
    """Listing the missing blocks up to the largest number built a set of a billion ints; 5000 digits did not parse."""
    path = tmp_path / "flux1-odd.safetensors"
    save_file({**load_file(tiny_snapshot / "flux1-schnell.safetensors"), key: torch.zeros(1)}, path)
    began = time.perf_counter()
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: ") + ".*" + message):
        load_flow_model(path)
    assert time.perf_counter() - began < 10


def snapshot_with(tiny_snapshot, tmp_path, relative: str, content: bytes):
    """The snapshot, linked file by file, with the file at `relative` holding `content` instead."""
    root = tmp_path / "snapshot"
    for source in tiny_snapshot.rglob("*"):
        target = root / source.relative_to(tiny_snapshot)
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif source.relative_to(tiny_snapshot).as_posix() != relative:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)
    (root / relative).parent.mkdir(parents=True, exist_ok=True)
    (root / relative).write_bytes(content)
    return root


JSON_FILES = {  # the file, and what reads it
    "vae/config.json": lambda root: load_autoencoder(root / "vae"),
    "text_encoder/config.json": lambda root: load_clip(root / "text_encoder"),
    "text_encoder_2/config.json": lambda root: load_t5(root / "text_encoder_2"),
    "tokenizer/tokenizer_config.json": lambda root: CLIPTokenizer.from_folder(root / "tokenizer"),
    "tokenizer_2/tokenizer.json": lambda root: T5Tokenizer.from_folder(root / "tokenizer_2"),
    "scheduler/scheduler_config.json": lambda root: sampling_defaults(root, guidance_embed=True),
    "flux_defaults.json": lambda root: sampling_defaults(root, guidance_embed=False),
}


@pytest.mark.parametrize("bomb", [b"[" * 100_000 + b"]" * 100_000, b'{"x": ' + b"9" * 5000 + b"}"], ids=["deep", "big-number"])
@pytest.mark.parametrize("file", JSON_FILES)
def test_json_bombs_name_the_file(tiny_snapshot, tmp_path, file, bomb):
    """Python's json raises RecursionError for deep nesting and a plain ValueError for numbers over 4300
    digits; the readers caught only JSONDecodeError."""
    root = snapshot_with(tiny_snapshot, tmp_path, file, bomb)
    with pytest.raises(CheckpointError, match=re.escape(f"{root / file}: not valid JSON")):
        JSON_FILES[file](root)


@pytest.mark.parametrize("value", ["0.36", float("nan"), True, [1], 0])
def test_autoencoder_scaling_factor_that_is_no_number(tiny_snapshot, tmp_path, value):
    config = json.loads((tiny_snapshot / "vae" / "config.json").read_text())
    root = snapshot_with(tiny_snapshot, tmp_path, "vae/config.json", json.dumps({**config, "scaling_factor": value}).encode())
    with pytest.raises(CheckpointError, match=re.escape(f"{root / 'vae'}: config.json gives scaling_factor = ")):
        load_autoencoder(root / "vae")


def test_autoencoder_factors_given_as_integers_are_floats(tiny_snapshot, tmp_path):
    """Found by this session's long fuzz run: JSON integers stayed ints in AutoEncoderParams' float fields."""
    config = json.loads((tiny_snapshot / "vae" / "config.json").read_text())
    root = snapshot_with(tiny_snapshot, tmp_path, "vae/config.json",
                         json.dumps({**config, "scaling_factor": 2, "shift_factor": -1}).encode())
    params = load_autoencoder(root / "vae", dtype=torch.float32).params
    assert (params.scale_factor, params.shift_factor) == (2.0, -1.0)
    assert type(params.scale_factor) is float and type(params.shift_factor) is float


@pytest.mark.parametrize("encoder, field", [("text_encoder_2", "num_layers"), ("text_encoder", "num_hidden_layers")])
def test_a_config_declaring_a_billion_layers_fails_fast(tiny_snapshot, tmp_path, encoder, field):
    """Building them, even on `meta`, took minutes and gigabytes before the weights were compared."""
    config = json.loads((tiny_snapshot / encoder / "config.json").read_text())
    root = snapshot_with(tiny_snapshot, tmp_path, f"{encoder}/config.json", json.dumps({**config, field: 10**9}).encode())
    load = load_t5 if encoder == "text_encoder_2" else load_clip
    began = time.perf_counter()
    with pytest.raises(CheckpointError, match=re.escape(f"{root / encoder}: config.json declares 1000000000 layers, but the weights hold 2")):
        load(root / encoder)
    assert time.perf_counter() - began < 10


def test_a_tokenizer_with_more_ids_than_the_embedding(tiny_snapshot, tmp_path):
    """The first prompt using the extra piece raised IndexError inside nn.Embedding."""
    content = json.loads((tiny_snapshot / "tokenizer_2" / "tokenizer.json").read_text())
    content["model"]["vocab"].append(["▁zzz", 0.0])
    root = snapshot_with(tiny_snapshot, tmp_path, "tokenizer_2/tokenizer.json", json.dumps(content).encode())
    with pytest.raises(CheckpointError, match=re.escape(f"{root / 'tokenizer_2'}: the tokenizer's ids go up to 150, but "
                                                        f"{root / 'text_encoder_2' / 'config.json'} gives the encoder 150 embeddings")):
        load_t5(root / "text_encoder_2")


@pytest.mark.parametrize("change", [{"red</w>": None}, {"red</w>": 2**40}, {"red</w>": 0}], ids=["null", "2**40", "shared id"])
def test_vocabulary_entries_the_tokenizers_library_would_drop_or_wrap(tiny_snapshot, tmp_path, change):
    folder = shutil.copytree(tiny_snapshot / "tokenizer", tmp_path / "tokenizer")
    (folder / "tokenizer.json").unlink()
    vocab = {**json.loads((folder / "vocab.json").read_text()), **change}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    read, _ = models.BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    assert read != vocab or len(set(read.values())) < len(read), "the library reads another vocabulary, or ambiguous ids"
    with pytest.raises(CheckpointError, match=re.escape(f"{folder / 'vocab.json'}: the vocabulary ")):
        CLIPTokenizer.from_folder(folder)


def test_merges_naming_tokens_the_vocabulary_lacks(tiny_snapshot, tmp_path):
    folder = shutil.copytree(tiny_snapshot / "tokenizer", tmp_path / "tokenizer")
    (folder / "tokenizer.json").unlink()
    (folder / "merges.txt").write_text("#v\0rsion: 0.2\n" + (folder / "merges.txt").read_text().split("\n", 1)[1])
    with pytest.raises(CheckpointError, match=re.escape(f"{folder}: the vocabulary and merges do not fit together")):
        CLIPTokenizer.from_folder(folder)


@pytest.mark.parametrize("charsmap, message", [("\udcff", "is not base64"), ("Z2FyYmFnZQ==", "normalisation table is unusable")])
def test_a_normalisation_table_that_is_no_table(tiny_snapshot, tmp_path, charsmap, message):
    folder = shutil.copytree(tiny_snapshot / "tokenizer_2", tmp_path / "tokenizer_2")
    content = json.loads((folder / "tokenizer.json").read_text())
    content["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": charsmap}
    (folder / "tokenizer.json").write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=re.escape(str(folder)) + ".*" + message):
        T5Tokenizer.from_folder(folder)


@pytest.mark.parametrize("entry", [[16, -1.0], ["a", "-1.5"], ["a", True], ["a"], "a"])
def test_a_unigram_vocab_entry_of_the_wrong_type(tiny_snapshot, tmp_path, entry):
    """Found by the long fuzz run of this session: a piece that is a number reached `re.fullmatch` (TypeError)."""
    folder = shutil.copytree(tiny_snapshot / "tokenizer_2", tmp_path / "tokenizer_2")
    content = json.loads((folder / "tokenizer.json").read_text())
    content["model"]["vocab"][111] = entry
    (folder / "tokenizer.json").write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=re.escape(str(folder / "tokenizer.json")) + ".*a string and a number each"):
        T5Tokenizer.from_folder(folder)


TOKENIZER_CONFIGS = {  # tokenizer_config.json fields of the wrong type, found by the long fuzz run
    "added_tokens_decoder a string": ("tokenizer", {"added_tokens_decoder": "x"}, "added_tokens_decoder must map ids"),
    "an added token that is an int": ("tokenizer_2", {"added_tokens_decoder": {"1": 0}}, "added_tokens_decoder must map ids"),
    "an added token flag that is no bool": ("tokenizer_2", {"added_tokens_decoder": {"1": {"content": "</s>", "lstrip": 2}}},
                                            "added_tokens_decoder must map ids"),
    "extra_ids null": ("tokenizer_2", {"extra_ids": None}, "extra_ids = None, expected an integer from 0 to 10000"),
    "extra_ids 10⁹": ("tokenizer_2", {"extra_ids": 10**9}, "extra_ids = 1000000000, expected an integer"),
    "a pad token with no content": ("tokenizer", {"pad_token": {"special": True}}, "the pad token None is not a string"),
    "a pad token that is a list": ("tokenizer", {"pad_token": ["<|endoftext|>"]}, "is not a string"),
}


@pytest.mark.parametrize("case", TOKENIZER_CONFIGS)
def test_tokenizer_configs_of_the_wrong_type(tiny_snapshot, tmp_path, case):
    """Before: AttributeError, TypeError, KeyError from inside the loader, or (10⁹ sentinels) no end."""
    name, change, message = TOKENIZER_CONFIGS[case]
    folder = shutil.copytree(tiny_snapshot / name, tmp_path / name)
    if name == "tokenizer_2":
        (folder / "tokenizer.json").unlink()  # spiece.model, where extra_ids counts the sentinels
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **change}))
    load = CLIPTokenizer.from_folder if name == "tokenizer" else T5Tokenizer.from_folder
    with pytest.raises(CheckpointError, match=re.escape(str(folder)) + ".*" + re.escape(message)):
        load(folder)


@pytest.mark.parametrize("change, message", [
    ({"num_steps": 0}, "num_steps = 0"), ({"num_steps": "4"}, "num_steps = '4'"), ({"num_steps": 10**12}, "num_steps = 1000000000000"),
    ({"guidance": float("nan")}, "guidance = nan"), ({"shift_schedule": "false"}, "shift_schedule = 'false'"),
    ({"max_sequence_length": 10**9}, "max_sequence_length = 1000000000"), ({"base_shift": 1e300}, "base_shift = 1e+300"),
    ({"image_size": 1000}, "image_size = 1000"), ({"image_size": 2**31}, "image_size = 2147483648"), ({"steps": 4}, "unexpected keyword argument 'steps'"),
])
def test_bad_sampling_defaults_name_the_file_and_field(tmp_path, change, message):
    (tmp_path / "flux_defaults.json").write_text(json.dumps(change))
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'flux_defaults.json'}: ") + ".*" + re.escape(message)):
        sampling_defaults(tmp_path, guidance_embed=False)


def test_scheduler_settings_of_the_wrong_type(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"use_dynamic_shifting": "false"}))
    with pytest.raises(CheckpointError, match=re.escape("scheduler_config.json: shift_schedule = 'false'")):
        sampling_defaults(tmp_path, guidance_embed=True)


# Bugs of flux/weights/lora.py the fuzz suite found (each escaped as a bare exception naming no file), fixed: the
# file is named, and what is wrong with it.
LORA_A, LORA_B = "transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight", "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight"
LORA_BUGS = {  # the change, the metadata JSON, what the error says
    "an .alpha tensor of 3 elements": ({"transformer.transformer_blocks.0.attn.to_out.0.alpha": torch.ones(3)}, None,
                                       "must be one finite number, got a tensor of shape (3,)"),
    "an infinite .alpha": ({"transformer.transformer_blocks.0.attn.to_out.0.alpha": torch.tensor(float("inf"))}, None,
                           "holding inf"),
    "rank 0": ({LORA_A: torch.ones(0, 384), LORA_B: torch.ones(384, 0)}, None, "has rank 0"),
    "adapter metadata a list": ({}, "[1]", "must be a JSON object"),
    "adapter metadata nested 100 000 deep": ({}, "[" * 100_000, "not valid JSON"),
    "adapter metadata with a 5000-digit number": ({}, '{"lora_alpha": ' + "9" * 5000 + "}", "not valid JSON"),
    "lora_alpha a string": ({}, '{"lora_alpha": "8"}', "lora_alpha must be a finite number, got '8'"),
    "lora_alpha NaN": ({}, '{"lora_alpha": NaN}', "lora_alpha must be a finite number, got nan"),
    "lora_alpha true": ({}, '{"lora_alpha": true}', "lora_alpha must be a finite number, got True"),
    "alpha_pattern a list": ({}, '{"alpha_pattern": [1]}', "alpha_pattern must map"),
    "alpha_pattern no regular expression": ({}, '{"alpha_pattern": {"(": 2}}', "is not a regular expression"),
    "alpha_pattern to a string": ({}, '{"alpha_pattern": {"to_out": "2"}}', "alpha_pattern['to_out'] must be a finite number"),
    "use_rslora a string": ({}, '{"use_rslora": "false"}', "use_rslora must be true or false"),
}


@pytest.fixture(scope="module")
def tiny_model(tiny_snapshot):
    return load_flow_model(tiny_snapshot / "flux1-schnell.safetensors", dtype=torch.float32)


@pytest.mark.parametrize("case", LORA_BUGS)
def test_broken_lora_files_name_the_file(tiny_model, tmp_path, case):
    from flux.weights.lora import unload_lora

    tensors, adapter_metadata, message = LORA_BUGS[case]
    generator = torch.Generator().manual_seed(0)
    lora = {LORA_A: torch.randn(4, 384, generator=generator), LORA_B: torch.randn(384, 4, generator=generator), **tensors}
    path = tmp_path / "lora.safetensors"
    save_file(lora, path, metadata={"lora_adapter_metadata": adapter_metadata} if adapter_metadata else None)
    try:
        with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*" + re.escape(message)):
            load_lora(tiny_model, path)
    finally:
        unload_lora(tiny_model)


def test_checked_adapter_config_still_scales(tiny_model, tmp_path):
    """The checks keep PEFT's rules: alpha_pattern's match at a dot wins over lora_alpha, which wins over rank."""
    from flux.weights.lora import unload_lora

    generator = torch.Generator().manual_seed(0)
    lora = {LORA_A: torch.randn(4, 384, generator=generator), LORA_B: torch.randn(384, 4, generator=generator)}
    scales = {}
    for name, config in {"pattern": {"lora_alpha": 8, "alpha_pattern": {"attn.to_out.0": 2}},
                         "alpha": {"lora_alpha": 8, "alpha_pattern": {"no_such_layer": 2}}, "rank": {}}.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(lora, path, metadata={"lora_adapter_metadata": json.dumps(config)})
        try:
            load_lora(tiny_model, path)
            layer = tiny_model.double_blocks[0].img_attn.proj
            scales[name] = [update.scale for update in layer.lora.updates]
        finally:
            unload_lora(tiny_model)
    assert scales == {"pattern": [2 / 4], "alpha": [8 / 4], "rank": [4 / 4]}


# --------------------------------------------------------------------------------------------------
# Hostile and odd user input
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(tiny_snapshot):
    return Pipeline.from_pretrained(tiny_snapshot, device="cpu", dtype=torch.float32)


def latents(pipe, prompt, **kwargs):
    """Small and quick: 32×32 pixels, two steps, 32 T5 tokens."""
    return pipe(prompt, **{"height": 32, "width": 32, "num_steps": 2, "seed": 0, "output_type": "latent",
                           "max_sequence_length": 32, "progress": False, **kwargs})


ODD_PROMPTS = {
    "control characters": "a cat\x00\x01\x07\x1b[31m\x7f\x85\u200b\ufeff end",
    "scripts and emoji": "東京の猫 🐱👩\u200d👩\u200d👧 café Ελληνικά",
    "empty": "",
    "100 000 characters": "a red cat " * 10_000,
}


@pytest.mark.parametrize("prompt", ODD_PROMPTS.values(), ids=ODD_PROMPTS.keys())
def test_odd_prompts_give_finite_images(pipe, prompt):
    image = pipe(prompt, height=32, width=32, num_steps=1, seed=0, output_type="np", progress=False)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_a_prompt_of_100000_characters_is_the_prompt_it_is_cut_to(pipe, caplog):
    """T5 keeps its first tokens (32 here) and CLIP its first 77: 10 000 repeats and 300 give the same image."""
    with caplog.at_level(logging.WARNING):
        long = latents(pipe, "a red cat " * 10_000)
    assert "dropped the last" in caplog.text
    assert torch.equal(long, latents(pipe, "a red cat " * 300))


def test_a_prompt_of_only_whitespace_is_the_empty_prompt(pipe):
    assert torch.equal(latents(pipe, " \t\n\u3000 "), latents(pipe, ""))


@pytest.mark.parametrize("kwargs", [dict(prompt="a \ud800 cat"), dict(prompt=["fine", "\udcff"]),
                                    dict(prompt="a cat", negative_prompt="\udfff", true_cfg_scale=2.0)])
def test_lone_surrogates_fail_before_any_work(pipe, monkeypatch, kwargs):
    monkeypatch.setattr(pipe, "_encode", lambda *args: pytest.fail("the text encoders ran"))
    with pytest.raises(ValueError, match="is not valid Unicode: it holds a lone surrogate"):
        pipe(**{"height": 32, "width": 32, "progress": False, **kwargs})


def test_the_smallest_image_is_16_pixels(pipe):
    image = pipe("a cat", height=16, width=16, num_steps=1, seed=0, output_type="np", progress=False)
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("kwargs", [dict(height=4096, width=4096), dict(height=65536, width=16),
                                    dict(num_images_per_prompt=10**6, height=64, width=64)])
def test_requests_larger_than_free_memory_are_refused_before_any_work(pipe, monkeypatch, kwargs):
    monkeypatch.setattr(flux.pipelines.pipeline, "free_memory", lambda device: 2**30)
    monkeypatch.setattr(pipe, "_encode", lambda *args: pytest.fail("the text encoders ran"))
    with pytest.raises(ValueError, match=r"need about [\d.]+ GiB for activations, and cpu has 1.0 GiB free; ask for fewer"):
        pipe("a cat", progress=False, **kwargs)


def test_requests_above_half_of_free_memory_warn(pipe, monkeypatch, caplog):
    needed = activation_bytes(pipe.model.params, pipe.ae, batch=1, height=32, width=32, text_tokens=256, itemsize=4, decode=True)
    monkeypatch.setattr(flux.pipelines.pipeline, "free_memory", lambda device: int(1.5 * needed))
    with caplog.at_level(logging.WARNING, logger="flux"):
        pipe("a cat", height=32, width=32, num_steps=1, seed=0, progress=False)
    assert "GiB free; this may run out of memory" in caplog.text


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be an integer ≥ 1"),
    (dict(num_images_per_prompt=True), "num_images_per_prompt must be an integer ≥ 1"),
    (dict(num_steps=10**9), r"num_steps must be an integer ≥ 1 \(and at most 10000\)"),
    (dict(width=True), "width must be a positive multiple of 16"),
    (dict(seed=2**64), r"a seed must be an integer in \[-2\*\*63, 2\*\*64 - 1\]"),
    (dict(seed=-(2**63) - 1), r"a seed must be an integer in"),
    (dict(seed=1.5), r"a seed must be an integer in"),
    (dict(seed="7"), r"a seed must be an integer in"),
    (dict(seed=[True]), r"a seed must be an integer in"),
    (dict(strength=float("nan"), image=torch.zeros(1, 3, 32, 32)), r"strength must lie in \(0, 1\]"),
    (dict(strength=float("inf"), image=torch.zeros(1, 3, 32, 32)), r"strength must lie in \(0, 1\]"),
    (dict(true_cfg_scale=float("inf"), negative_prompt="blur"), "true_cfg_scale must be a finite number ≥ 1"),
    (dict(true_cfg_scale=float("nan"), negative_prompt="blur"), "true_cfg_scale must be a finite number ≥ 1"),
    (dict(max_sequence_length=513), r"max_sequence_length must be an integer in \[2, 512\]"),
    (dict(max_sequence_length=0), r"max_sequence_length must be an integer in \[2, 512\]"),
    (dict(negative_prompt=5), "negative_prompt must be a string or a list of strings"),
    (dict(callback=5), "callback must be a function"),
    (dict(prompt=None), "prompt must be a string or a non-empty list of strings"),
    (dict(prompt=5), "prompt must be a string or a non-empty list of strings"),
])
def test_bad_arguments_are_refused_by_name(pipe, monkeypatch, kwargs, message):
    monkeypatch.setattr(pipe, "_encode", lambda *args: pytest.fail("the text encoders ran"))
    with pytest.raises(ValueError, match=message):
        pipe(**{"prompt": "a cat", "height": 32, "width": 32, "progress": False, **kwargs})


@pytest.mark.parametrize("seed", [0, 2**63 - 1, 2**64 - 1, -(2**63), -1])
def test_seeds_at_the_int64_limits(pipe, seed):
    """Every seed torch.Generator takes is a seed, drawing torch's own numbers for it."""
    reference = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(get_noise(1, 32, 32, seed=seed), reference)
    result = latents(pipe, "a cat", seed=seed, num_steps=1)
    assert torch.isfinite(result).all() and torch.equal(result, latents(pipe, "a cat", seed=[seed], num_steps=1))


def test_numpy_integers_are_seeds(pipe):
    assert torch.equal(latents(pipe, "a cat", seed=np.int64(7)), latents(pipe, "a cat", seed=7))


@pytest.fixture(scope="module")
def dev_pipe(tiny_dev_snapshot):
    return Pipeline.from_pretrained(tiny_dev_snapshot, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("guidance", [float("nan"), float("inf"), -float("inf"), True, "3.5"])
def test_guidance_that_is_no_finite_number(dev_pipe, guidance):
    with pytest.raises(ValueError, match="guidance must be a finite number"):
        dev_pipe("a cat", height=32, width=32, guidance=guidance, progress=False)


# --------------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------------

PROMPTS = ["a red circle at the top of a blue background", "a small green triangle on the left", "a cat"]


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def pipe_in(request, tiny_snapshot):
    return Pipeline.from_pretrained(tiny_snapshot, device="cpu", dtype=request.param)


def test_the_same_seed_gives_the_same_bits(pipe_in):
    first = latents(pipe_in, PROMPTS, seed=[1, 2, 3], height=48, width=64, num_steps=3)
    assert torch.equal(first, latents(pipe_in, PROMPTS, seed=[1, 2, 3], height=48, width=64, num_steps=3))


# Measured on the tiny models (docs/hardening.md): an image's latents in a batch of three differ from the same
# image alone by at most 9.5e-7 in fp32 and 7.8e-3 in bf16 (latents up to 4.4), from the transformer's matrix
# products, whose CPU kernels sum in an order that depends on the number of rows; the text encoders and the
# decoder are batch-invariant here. Leakage between samples would differ by whole units.
BATCH_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def test_an_image_in_a_batch_is_that_image_alone(pipe_in):
    batch = latents(pipe_in, PROMPTS, seed=[1, 2, 3])
    for index, prompt in enumerate(PROMPTS):
        alone = latents(pipe_in, prompt, seed=index + 1)
        error = (batch[index] - alone[0]).abs().max().item()
        assert error <= BATCH_TOLERANCE[pipe_in.dtype], f"image {index}: {error:.2e} from the image alone"


def test_one_seed_for_a_batch_draws_it_from_one_generator(pipe):
    """As the official code and diffusers: image i is the i-th draw, so only the first equals its seed alone."""
    batch = latents(pipe, PROMPTS[:2], seed=5)
    # Equal up to fp32 rounding: a batch of 2 against 1 may block the matmuls' sums differently.
    torch.testing.assert_close(batch[0], latents(pipe, PROMPTS[0], seed=5)[0], rtol=1e-5, atol=1e-5)
    assert (batch[1] - latents(pipe, PROMPTS[1], seed=5)[0]).abs().max() > 0.1


# --------------------------------------------------------------------------------------------------
# fp16
# --------------------------------------------------------------------------------------------------

def test_a_float16_generation_is_finite_everywhere(tiny_dev_snapshot):
    """Every output of every module of the four components, through guidance, true CFG, a truncated prompt."""
    pipe = Pipeline.from_pretrained(tiny_dev_snapshot, device="cpu", dtype=torch.float16)
    not_finite = []

    def check(name):
        def hook(module, inputs, output):
            for tensor in output if isinstance(output, tuple) else (output,):
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    not_finite.append(name)
        return hook

    for part in ("model", "ae", "t5", "clip"):
        for name, module in getattr(pipe, part).named_modules():
            module.register_forward_hook(check(f"{part}.{name}"))
    images = pipe(["a red cat", "x " * 1000], height=32, width=48, num_steps=2, guidance=3.5, seed=0, max_sequence_length=64,
                  negative_prompt="blurry", true_cfg_scale=2.0, output_type="pt", progress=False)
    assert not not_finite, f"non-finite outputs from {not_finite[:5]}"
    assert torch.isfinite(images).all()
    with pytest.raises(ValueError, match=r"guidance 100.0 is too large for a torch.float16 model"):
        pipe("a cat", height=32, width=32, guidance=100.0, progress=False)


def model_inputs(params, dtype, batch=2, tokens=16, text=8):
    generator = torch.Generator().manual_seed(0)
    img_ids = torch.zeros(batch, tokens, 3)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(tokens) // 4, torch.arange(tokens) % 4
    return dict(img=torch.randn(batch, tokens, params.in_channels, generator=generator).to(dtype), img_ids=img_ids,
                txt=torch.randn(batch, text, params.context_in_dim, generator=generator).to(dtype),
                txt_ids=torch.zeros(batch, text, 3), timesteps=torch.tensor([0.9, 0.3]).to(dtype),
                y=torch.randn(batch, params.vec_in_dim, generator=generator).to(dtype))


def overflowing(model, kind: str):
    """A copy whose activations pass fp16's largest value (65504) at one place, and stay moderate in fp32."""
    model = copy.deepcopy(model)
    state, hidden = model.state_dict(), model.params.hidden_size
    with torch.no_grad():
        if kind == "residual stream":  # gates near 1 and an MLP output of 4e4: the text stream passes 65504 by block 1
            for i in range(model.params.depth):
                state[f"double_blocks.{i}.txt_mod.lin.bias"][5 * hidden:] += 1
                state[f"double_blocks.{i}.txt_mlp.2.bias"] += 4e4
        elif kind == "modulation":  # a shift of 7e4: the modulated input itself overflows
            state["double_blocks.0.img_mod.lin.bias"][:hidden] += 7e4
        else:  # attention: values of about 1e6
            state["double_blocks.0.img_attn.qkv.weight"][2 * hidden:] *= 3e4
    return model


@pytest.mark.parametrize("kind", ["residual stream", "modulation", "attention"])
def test_each_float16_guard_keeps_an_overflow_finite(tiny_model, monkeypatch, kind):
    model = overflowing(tiny_model, kind)
    with torch.no_grad():
        full = model(**model_inputs(model.params, torch.float32))
        half = model.half()
        guarded = half(**model_inputs(model.params, torch.float16))
        monkeypatch.setattr(flux.modules.transformer, "float16_guard", lambda x: x)
        unguarded = half(**model_inputs(model.params, torch.float16))
    assert torch.isfinite(full).all() and not torch.isfinite(unguarded).all(), "the case must overflow fp16 only"
    assert torch.isfinite(guarded).all()
    # Clamped at 65504 where fp32 holds more, so not equal: measured 4 %, 21 % and 1 % RMS from fp32.
    assert ((guarded.float() - full).norm() / full.norm()).item() < 0.4


def test_float16_guards_match_diffusers_clamp(tiny_snapshot, tmp_path):
    """diffusers clamps the text stream of its double blocks to ±65504 in fp16; on weights that overflow it
    there, the guarded model gives diffusers' fp16 output."""
    reference = diffusers.FluxTransformer2DModel.from_pretrained(tiny_snapshot / "transformer").eval()
    hidden = reference.config.num_attention_heads * reference.config.attention_head_dim
    with torch.no_grad():
        for block in reference.transformer_blocks:  # the same overflow as "residual stream" above, in its names
            block.norm1_context.linear.bias[5 * hidden:] += 1
            block.ff_context.net[2].bias += 4e4
    reference.save_pretrained(tmp_path)
    ours = load_flow_model(tmp_path, dtype=torch.float16)
    x = model_inputs(ours.params, torch.float16)
    with torch.no_grad():
        theirs = reference.half()(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                                  timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                                  return_dict=False)[0]
        mine = ours(**x)
    assert torch.isfinite(theirs).all() and torch.isfinite(mine).all()
    error = ((mine.float() - theirs.float()).norm() / theirs.float().norm()).item()
    assert error < 1e-2, f"fp16 RMS difference from diffusers {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_guards_leave_bf16_and_fp32_alone(tiny_model, monkeypatch, dtype):
    x = torch.full((3,), 1e6, dtype=dtype)
    assert flux.modules.transformer.float16_guard(x) is x
    model = overflowing(tiny_model, "residual stream").to(dtype)
    with torch.no_grad():
        guarded = model(**model_inputs(model.params, dtype))
        monkeypatch.setattr(flux.modules.transformer, "float16_guard", lambda x: x)
        assert torch.equal(guarded, model(**model_inputs(model.params, dtype)))
