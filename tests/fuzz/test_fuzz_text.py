"""Fuzzing the tokenizer loaders (flux/weights/tokenizers.py) and the text encoder loaders (`load_t5`, `load_clip`).

Seeds are the tiny snapshot's tokenizer/ and tokenizer_2/ folders (vocab.json + merges.txt, spiece.model,
tokenizer.json) with the fields FLUX.1's own configs carry added (`added_tokens_decoder`, a serialised pad
token), and its text_encoder/ and text_encoder_2/ folders. tests/test_tokenizers.py holds the hand-written
corrupt-file cases; here the mutations are random. A tokenizer that loads must then tokenize odd prompts into
ids its vocabulary holds; an encoder that loads must encode them into finite states.
"""

import json
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flux.weights.loading import load_clip, load_t5
from flux.weights.tokenizers import CLIPTokenizer, T5Tokenizer
from fuzzing import bounded, case_folder, fuzz_settings, mutated_bytes, mutated_json_file, mutated_safetensors, outcome

PROMPTS = ["a red cat", "", "   ", "<pad></s><unk><extra_id_0> <|endoftext|><|startoftext|>", "x" * 500,
           "control\x00\x07\x1b[31m\x7f chars", "東京 🐱 café"]


@pytest.fixture(scope="module")
def tokenizer_seeds(tiny_snapshot, tmp_path_factory):
    """The snapshot's tokenizer folders, their configs given the fields FLUX.1's carry, one folder per layout."""
    root = tmp_path_factory.mktemp("tokenizers")
    marker = dict(lstrip=False, normalized=True, rstrip=False, single_word=False, special=True)
    layouts = {"clip: vocab.json": ("tokenizer", ["tokenizer.json"]), "clip: tokenizer.json": ("tokenizer", ["vocab.json", "merges.txt"]),
               "t5: spiece.model": ("tokenizer_2", ["tokenizer.json"]), "t5: tokenizer.json": ("tokenizer_2", ["spiece.model"])}
    for layout, (name, left_out) in layouts.items():
        folder = shutil.copytree(tiny_snapshot / name, root / layout.replace(": ", "-"))
        for file in left_out:
            (folder / file).unlink()
        config = json.loads((folder / "tokenizer_config.json").read_text())
        if name == "tokenizer":
            vocab = json.loads((tiny_snapshot / name / "vocab.json").read_text())
            config["added_tokens_decoder"] = {str(vocab[t]): {"content": t, **marker} for t in ("<|startoftext|>", "<|endoftext|>")}
            (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<|endoftext|>", **marker}}))
        else:
            config["added_tokens_decoder"] = {str(i): {"content": t, **marker, "normalized": False}
                                              for i, t in enumerate(("<pad>", "</s>", "<unk>"))}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return root


def mutate_files(data, folder, names):
    """One or two of the folder's files (`names`), each mutated once, by its kind."""
    for name in data.draw(st.lists(st.sampled_from(sorted(names)), min_size=1, max_size=2, unique=True)):
        path = folder / name
        if name.endswith(".json"):
            path.write_bytes(data.draw(mutated_json_file(json.loads(path.read_text(encoding="utf-8")))))
        elif name.endswith(".safetensors"):
            path.write_bytes(data.draw(mutated_safetensors(path.read_bytes())))
        else:  # spiece.model, merges.txt
            path.write_bytes(data.draw(mutated_bytes(path.read_bytes())))


@pytest.mark.parametrize("layout", ["clip: vocab.json", "clip: tokenizer.json", "t5: spiece.model", "t5: tokenizer.json"])
@given(data=st.data())
@fuzz_settings(ci_examples=25)
def test_tokenizer_folders(tokenizer_seeds, tmp_path, layout, data):
    with case_folder(tmp_path) as root:
        folder = shutil.copytree(tokenizer_seeds / layout.replace(": ", "-"), root / "tokenizer")
        mutate_files(data, folder, [p.name for p in folder.iterdir()])
        load = CLIPTokenizer.from_folder if layout.startswith("clip") else T5Tokenizer.from_folder
        tokenizer = outcome(lambda: load(folder, max_length=16), names=[folder])
        if tokenizer is not None:
            with bounded():
                ids = tokenizer(PROMPTS)
            assert ids.dtype == torch.long and ids.shape == (len(PROMPTS), 16)
            assert 0 <= ids.min() and ids.max() <= max(tokenizer.backend.get_vocab(with_added_tokens=True).values())


@pytest.mark.parametrize("encoder", ["t5", "clip"])
@given(data=st.data())
@fuzz_settings(ci_examples=25)
def test_text_encoder_folders(tiny_snapshot, tmp_path, encoder, data):
    """A repository's text_encoder(_2)/ and tokenizer(_2)/ with one or two files mutated, config.json included."""
    names = ("text_encoder_2", "tokenizer_2") if encoder == "t5" else ("text_encoder", "tokenizer")
    with case_folder(tmp_path) as root:
        for name in names:
            shutil.copytree(tiny_snapshot / name, root / name)
        files = [f"{name}/{p.name}" for name in names for p in (root / name).iterdir()]
        mutate_files(data, root, files)
        load = (lambda: load_t5(root / names[0], max_length=16, dtype=torch.float32)) if encoder == "t5" else (
            lambda: load_clip(root / names[0], dtype=torch.float32))
        model = outcome(load, names=[root / names[0], root / names[1]])
        if model is not None:
            with bounded(), torch.no_grad():
                states = model(PROMPTS)
            assert states.shape[0] == len(PROMPTS) and torch.isfinite(states).all()
