"""The CLIP text tower against transformers' `CLIPTextModel`, the independent reference.

transformers builds a small random CLIP text model and saves it as the FLUX.1 repository lays it out
(`text_encoder/` beside `tokenizer/`); we read that folder with `load_clip` and compare the pooled output
and every token's final state. The full-size module is checked against the official file's manifest.
"""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from snapshots import MANIFESTS, clip_tokenizer_files
from safetensors.torch import save_file

from flux import CheckpointError, load_clip
from flux.modules.clip import CLIP_L, CLIPTextConfig, CLIPTextModel
from flux.weights.loading import read_clip_config

transformers = pytest.importorskip("transformers")

# Width 64 in 4 heads of 16, MLP 96, 2 layers; the official 77 positions (the tokenizer pads to them).
TINY = CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5, eos_token_id=None)
EOS = 7  # the end-of-text id of the "first eos" variant, smaller than most ids so argmax would miss it

# text_encoder/config.json of black-forest-labs/FLUX.1-schnell (and -dev), as published.
OFFICIAL_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"], "attention_dropout": 0.0,
    "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.3", "vocab_size": 49408,
}


def reference_model(*, eos_token_id: int, seed: int = 0):
    """eos_token_id 2 is the official config's value: transformers then pools at argmax(input_ids)."""
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=TINY.vocab_size, hidden_size=TINY.hidden_size, intermediate_size=TINY.intermediate_size,
        num_hidden_layers=TINY.num_hidden_layers, num_attention_heads=TINY.num_attention_heads,
        max_position_embeddings=TINY.max_position_embeddings, layer_norm_eps=TINY.layer_norm_eps,
        hidden_act="quick_gelu", bos_token_id=0, eos_token_id=eos_token_id, pad_token_id=1,
    )).eval()
    with torch.no_grad():  # transformers' initialisation, then noise everywhere (norms start at 1 and 0)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def relative_error(ours, reference):
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def token_ids(seed=0):
    """Random ids with end-of-text tokens (EOS) placed where neither argmax nor the last position finds them."""
    ids = torch.randint(10, TINY.vocab_size, (3, 77), generator=torch.Generator().manual_seed(seed))
    ids[0, [5, 40]], ids[1, 20], ids[2, 76] = EOS, EOS, EOS
    return ids


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    """tokenizer/ as the repository has it: vocab.json and merges.txt, padded with <|endoftext|>."""
    folder = tmp_path_factory.mktemp("tokenizer")
    clip_tokenizer_files(folder)
    transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token="<|endoftext|>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=[2, EOS], ids=["argmax-pooling", "first-eos-pooling"])
def snapshot(request, tmp_path_factory, tokenizer_folder):
    model = reference_model(eos_token_id=request.param)
    root = tmp_path_factory.mktemp("clip")
    model.save_pretrained(root / "text_encoder")  # transformers 5 writes the keys without `text_model.`
    shutil.copytree(tokenizer_folder, root / "tokenizer")
    return root, model


@pytest.mark.parametrize("where", ["", "text_encoder"], ids=["snapshot-root", "component"])
def test_matches_transformers_in_float32(snapshot, where):
    root, reference = snapshot
    clip = load_clip(root / where, dtype=torch.float32)
    ids = token_ids()
    with torch.no_grad():
        expected = reference(ids)
        pooled, hidden = clip.encode(ids), clip.model.hidden_states(ids)
    assert pooled.shape == (3, TINY.hidden_size)
    for ours, theirs in [(pooled, expected.pooler_output), (hidden, expected.last_hidden_state)]:
        error = relative_error(ours, theirs)
        assert error <= 1e-5, f"max relative error {error:.2e}"


def test_attention_mask_matches_transformers(snapshot):
    root, reference = snapshot
    clip = load_clip(root, dtype=torch.float32)
    ids = token_ids()
    mask = torch.ones_like(ids)
    mask[0, 50:], mask[1, 21:] = 0, 0
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask)
        hidden, pooled = clip.model.hidden_states(ids, attention_mask=mask), clip.encode(ids, attention_mask=mask)
    for ours, theirs in [(pooled, expected.pooler_output), (hidden, expected.last_hidden_state)]:
        error = relative_error(ours, theirs)
        assert error <= 1e-5, f"max relative error {error:.2e}"


def test_bfloat16_is_close_to_transformers(snapshot):
    root, _ = snapshot
    reference = transformers.CLIPTextModel.from_pretrained(root / "text_encoder", dtype=torch.bfloat16).eval()
    clip = load_clip(root, dtype=torch.bfloat16)
    ids = token_ids()
    with torch.no_grad():
        ours, theirs = clip.encode(ids), reference(ids).pooler_output
    assert ours.dtype == torch.bfloat16
    error = relative_error(ours, theirs)
    assert error <= 2e-2, f"max relative error {error:.2e}"


def test_prompts_match_transformers_tokenizer_and_model(snapshot):
    root, reference = snapshot
    clip = load_clip(root, dtype=torch.float32)
    prompts = ["a red circle at the top left", "a photo of a cat " * 30]  # the second is truncated to 77 tokens
    tokenizer = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer")
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(clip.tokenize(prompts), ids)
    with torch.no_grad():
        ours, theirs = clip(prompts), reference(ids).pooler_output
    assert ours.shape == (2, TINY.hidden_size)
    error = relative_error(ours, theirs)
    assert error <= 1e-5, f"max relative error {error:.2e}"


@pytest.mark.parametrize("prefix", ["text_model.", ""], ids=["transformers-4-layout", "transformers-5-layout"])
def test_keys_with_or_without_prefix_and_position_ids_load(snapshot, tmp_path, prefix):
    """transformers 4 wrote `text_model.`-prefixed keys (the official file) and sometimes the position ids."""
    root, reference = snapshot
    state_dict = {prefix + k: v.contiguous() for k, v in reference.state_dict().items()}
    state_dict[prefix + "embeddings.position_ids"] = torch.arange(77)[None]
    (tmp_path / "text_encoder").mkdir()
    save_file(state_dict, tmp_path / "text_encoder" / "model.safetensors")
    shutil.copy(root / "text_encoder" / "config.json", tmp_path / "text_encoder")
    shutil.copytree(root / "tokenizer", tmp_path / "tokenizer")
    ids = token_ids()
    with torch.no_grad():
        error = relative_error(load_clip(tmp_path, dtype=torch.float32).encode(ids), reference(ids).pooler_output)
    assert error <= 1e-5, f"max relative error {error:.2e}"


def test_mixed_prefixes_are_refused(snapshot, tmp_path):
    root, reference = snapshot
    state_dict = {("text_model." if "layers.0." in k else "") + k: v.contiguous() for k, v in reference.state_dict().items()}
    (tmp_path / "text_encoder").mkdir()
    save_file(state_dict, tmp_path / "text_encoder" / "model.safetensors")
    shutil.copy(root / "text_encoder" / "config.json", tmp_path / "text_encoder")
    shutil.copytree(root / "tokenizer", tmp_path / "tokenizer")
    with pytest.raises(CheckpointError, match="text_model."):
        load_clip(tmp_path)


def test_full_size_module_matches_the_official_manifest():
    manifest = json.loads((MANIFESTS / "clip-l.json").read_text())
    with torch.device("meta"):
        model = CLIPTextModel(CLIP_L)
    ours = [(name, list(tensor.shape)) for name, tensor in model.state_dict().items()]
    assert ours == [(name, shape) for name, (shape, _) in manifest["tensors"].items()]
    assert sum(p.numel() for p in model.parameters()) == manifest["parameters"]
    assert not list(model.buffers())  # no position_ids buffer: it would stay on meta after loading


def test_official_config_json_reads_as_the_clip_l_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    assert read_clip_config(tmp_path) == CLIP_L


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
    ({"num_attention_heads": 7}, "must be divisible by num_attention_heads 7"),
    ({"layer_norm_eps": 0}, "layer_norm_eps must be a positive float"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_bad_config_values_name_the_file_and_the_field(tmp_path, change, message):
    config = {k: v for k, v in {**OFFICIAL_CONFIG, **change}.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message) as error:
        read_clip_config(tmp_path)
    assert str(tmp_path / "config.json") in str(error.value)


def test_missing_pieces_are_named(snapshot, tmp_path):
    root, _ = snapshot
    with pytest.raises(CheckpointError, match="not found"):
        load_clip(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_clip(tmp_path / "empty")
    shutil.copytree(root / "text_encoder", tmp_path / "alone" / "text_encoder")
    with pytest.raises(CheckpointError, match="tokenizer") as error:
        load_clip(tmp_path / "alone")
    assert str(tmp_path / "alone" / "text_encoder") in str(error.value)


def test_pooling_reads_the_configured_token():
    """Invariant: the pooled vector is the hidden state at the first end-of-text token, in either mode."""
    torch.manual_seed(0)
    ids = token_ids()
    first_eos = CLIPTextModel(replace(TINY, eos_token_id=EOS)).eval()
    argmax = CLIPTextModel(TINY).eval()
    argmax.load_state_dict(first_eos.state_dict())
    with torch.no_grad():
        hidden = first_eos.hidden_states(ids)
        assert torch.equal(first_eos(ids), hidden[[0, 1, 2], [5, 20, 76]])
        assert torch.equal(argmax(ids), hidden[[0, 1, 2], ids.argmax(-1)])
