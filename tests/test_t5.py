"""The T5 encoder against transformers' `T5EncoderModel`, the independent reference.

transformers builds a small random T5 v1.1 encoder and saves it as the FLUX.1 repository lays it out
(`text_encoder_2/` beside `tokenizer_2/`); we read that folder with `load_t5` and compare last hidden states.
The full-size module is checked against the official file's manifest, without any weights.
"""

import json
import shutil

import pytest
import torch
from snapshots import MANIFESTS, t5_spiece_model
from safetensors.torch import save_file

from flux import CheckpointError, load_t5
from flux.weights.loading import read_t5_config
from flux.modules.t5 import T5_XXL, T5Config, T5Encoder, relative_position_bucket

transformers = pytest.importorskip("transformers")

# Deliberately unequal sizes: heads * d_kv = 128 differs from d_model = 64, d_ff = 96, 3 layers, 4 heads.
# max_distance 20 (not 128) so that a 40-token prompt reaches the shared farthest bucket.
TINY = T5Config(vocab_size=1000, d_model=64, d_kv=32, d_ff=96, num_layers=3, num_heads=4,
                relative_attention_num_buckets=32, relative_attention_max_distance=20, layer_norm_epsilon=1e-6)

# text_encoder_2/config.json of black-forest-labs/FLUX.1-schnell (and -dev), as published.
OFFICIAL_CONFIG = {
    "_name_or_path": "google/t5-v1_1-xxl", "architectures": ["T5EncoderModel"], "classifier_dropout": 0.0,
    "d_ff": 10240, "d_kv": 64, "d_model": 4096, "decoder_start_token_id": 0, "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
    "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
    "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24, "output_past": True, "pad_token_id": 0,
    "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.3", "use_cache": True, "vocab_size": 32128,
}


def reference_model(config: T5Config, *, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_kv, d_ff=config.d_ff,
        num_layers=config.num_layers, num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        layer_norm_epsilon=config.layer_norm_epsilon, feed_forward_proj="gated-gelu", dropout_rate=0.0,
    )).eval()
    with torch.no_grad():  # transformers' initialisation, then noise everywhere (the norms start at exactly 1)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def relative_error(ours, reference):
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def token_ids(batch=2, length=40, seed=0):
    return torch.randint(0, TINY.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    """tokenizer_2/ as the repository has it: the sentencepiece model and transformers' tokenizer.json."""
    folder = tmp_path_factory.mktemp("tokenizer_2")
    t5_spiece_model(folder)
    transformers.T5TokenizerFast.from_pretrained(folder, extra_ids=100).save_pretrained(folder)
    return folder


def save_snapshot(model, root, tokenizer_folder, **save_options):
    model.save_pretrained(root / "text_encoder_2", **save_options)
    shutil.copytree(tokenizer_folder, root / "tokenizer_2")
    return root


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory, tokenizer_folder):
    """A FLUX.1-style root holding the reference model, and a sharded copy with its tokenizer inside."""
    model = reference_model(TINY)
    root = save_snapshot(model, tmp_path_factory.mktemp("t5"), tokenizer_folder)
    model.save_pretrained(root / "sharded", max_shard_size="100KB")
    shutil.copytree(tokenizer_folder, root / "sharded", dirs_exist_ok=True)
    return root, model


@pytest.mark.parametrize("where", ["", "text_encoder_2", "sharded"], ids=["snapshot-root", "component", "sharded"])
def test_matches_transformers_in_float32(snapshot, where):
    root, reference = snapshot
    if where == "sharded":
        assert len(list((root / where).glob("model-*.safetensors"))) > 1, "the save was meant to be sharded"
    t5 = load_t5(root / where, dtype=torch.float32)
    ids = token_ids()
    with torch.no_grad():
        error = relative_error(t5.encode(ids), reference(ids).last_hidden_state)
    assert error <= 1e-5, f"max relative error {error:.2e}"


def test_attention_mask_matches_transformers(snapshot):
    root, reference = snapshot
    t5 = load_t5(root, dtype=torch.float32)
    ids = token_ids()
    mask = torch.ones_like(ids)
    mask[0, 33:], mask[1, 12:] = 0, 0  # padding on the right, as the tokenizer pads
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).last_hidden_state
        masked, boolean = t5.encode(ids, attention_mask=mask), t5.encode(ids, attention_mask=mask.bool())
        unmasked = t5.encode(ids)
    error = relative_error(masked, expected)
    assert error <= 1e-5, f"max relative error {error:.2e}"
    assert torch.equal(masked, boolean)
    assert relative_error(unmasked, expected) > 1e-2, "the mask must change the result"


def test_bfloat16_is_close_to_transformers(snapshot):
    root, _ = snapshot
    reference = transformers.T5EncoderModel.from_pretrained(root / "text_encoder_2", dtype=torch.bfloat16).eval()
    t5 = load_t5(root, dtype=torch.bfloat16)
    ids = token_ids()
    with torch.no_grad():
        ours, theirs = t5.encode(ids), reference(ids).last_hidden_state
    assert ours.dtype == torch.bfloat16
    error = relative_error(ours, theirs)
    assert error <= 2e-2, f"max relative error {error:.2e}"


def test_float16_residual_is_clamped_like_transformers(tmp_path, tokenizer_folder, monkeypatch):
    reference = reference_model(TINY, seed=1)
    with torch.no_grad():  # a feed-forward output far beyond fp16's range (65504)
        for block in reference.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(2e4)
    root = save_snapshot(reference, tmp_path, tokenizer_folder)
    ids = token_ids(seed=1)

    t5 = load_t5(root, dtype=torch.float32)
    largest = []
    for block in t5.model.encoder.block:
        block.register_forward_hook(lambda module, args, out: largest.append(out.abs().max().item()))
    with torch.no_grad():
        t5.encode(ids)
    assert max(largest) > 1.2 * torch.finfo(torch.float16).max, f"the fp32 residual peaks at only {max(largest)}"

    t5 = load_t5(root, dtype=torch.float16)
    assert t5.model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32  # as transformers
    reference = transformers.T5EncoderModel.from_pretrained(root / "text_encoder_2", dtype=torch.float16).eval()
    with torch.no_grad():
        ours, theirs = t5.encode(ids), reference(ids).last_hidden_state
    assert ours.dtype == torch.float16 and ours.isfinite().all()
    error = relative_error(ours, theirs)
    assert error <= 1e-2, f"max relative error {error:.2e}"

    # Cast wholly to fp16 by hand (no fp32 `wo`), only the residual clamp keeps the output finite.
    t5.half()
    with torch.no_grad():
        clamped = t5.encode(ids)
        monkeypatch.setattr("flux.modules.t5.clamp_to_float16_range", lambda x: x)
        unguarded = t5.encode(ids)
    assert not unguarded.isfinite().all(), "without the clamp, fp16 should overflow on this model"
    assert clamped.isfinite().all()


def test_prompts_match_transformers_tokenizer_and_model(snapshot):
    root, reference = snapshot
    t5 = load_t5(root, max_length=16, dtype=torch.float32)
    prompts = ["a red circle at the top left", "a photo of a cat on the sky over a green square with a dog in the "
               "background under a blue triangle"]  # the second is longer than 16 tokens: truncated
    tokenizer = transformers.T5TokenizerFast.from_pretrained(root / "tokenizer_2")
    ids = tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(t5.tokenize(prompts), ids)
    with torch.no_grad():
        ours, theirs = t5(prompts), reference(ids).last_hidden_state
    assert ours.shape == (2, 16, TINY.d_model)
    error = relative_error(ours, theirs)
    assert error <= 1e-5, f"max relative error {error:.2e}"


def test_tied_embedding_copy_is_accepted(snapshot, tmp_path, tokenizer_folder):
    """Some T5 files store the tied `encoder.embed_tokens.weight` beside `shared.weight`."""
    root, reference = snapshot
    state_dict = {k: v.contiguous() for k, v in reference.state_dict().items()}
    state_dict["encoder.embed_tokens.weight"] = state_dict["shared.weight"].clone()
    (tmp_path / "text_encoder_2").mkdir()
    save_file(state_dict, tmp_path / "text_encoder_2" / "model.safetensors")
    shutil.copy(root / "text_encoder_2" / "config.json", tmp_path / "text_encoder_2")
    shutil.copytree(tokenizer_folder, tmp_path / "tokenizer_2")
    ids = token_ids()
    with torch.no_grad():
        error = relative_error(load_t5(tmp_path, dtype=torch.float32).encode(ids), reference(ids).last_hidden_state)
    assert error <= 1e-5, f"max relative error {error:.2e}"


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (32, 20), (8, 5)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
    distance = torch.arange(-300, 301)
    expected = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        distance, bidirectional=True, num_buckets=num_buckets, max_distance=max_distance)
    assert torch.equal(relative_position_bucket(distance, num_buckets=num_buckets, max_distance=max_distance), expected)


def test_full_size_module_matches_the_official_manifest():
    manifest = json.loads((MANIFESTS / "t5-xxl.json").read_text())
    with torch.device("meta"):
        model = T5Encoder(T5_XXL)
    ours = [(name, list(tensor.shape)) for name, tensor in model.state_dict().items()]
    assert ours == [(name, shape) for name, (shape, _) in manifest["tensors"].items()]
    assert sum(p.numel() for p in model.parameters()) == manifest["parameters"]
    assert not list(model.buffers())  # a non-persistent buffer would stay on meta after loading


def test_official_config_json_reads_as_the_xxl_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    assert read_t5_config(tmp_path) == T5_XXL


@pytest.mark.parametrize("change, message", [
    ({"feed_forward_proj": "relu"}, "feed_forward_proj is 'relu'"),
    ({"num_heads": 0}, "num_heads must be a positive integer, got 0"),
    ({"d_model": "4096"}, "d_model must be a positive integer, got '4096'"),
    ({"relative_attention_num_buckets": 30}, "multiple of 4"),
    ({"vocab_size": None}, "vocab_size"),
])
def test_bad_config_values_name_the_file_and_the_field(tmp_path, change, message):
    config = {k: v for k, v in {**OFFICIAL_CONFIG, **change}.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message) as error:
        read_t5_config(tmp_path)
    assert str(tmp_path / "config.json") in str(error.value)


def test_missing_pieces_are_named(snapshot, tmp_path):
    root, _ = snapshot
    with pytest.raises(CheckpointError, match="not found"):
        load_t5(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_t5(tmp_path / "empty")
    shutil.copytree(root / "text_encoder_2", tmp_path / "alone" / "text_encoder_2")
    with pytest.raises(CheckpointError, match="tokenizer_2") as error:
        load_t5(tmp_path / "alone")
    assert str(tmp_path / "alone" / "text_encoder_2") in str(error.value)
    config = json.loads((root / "text_encoder_2" / "config.json").read_text())
    (tmp_path / "alone" / "text_encoder_2" / "config.json").write_text(json.dumps({**config, "d_ff": 80}))
    shutil.copytree(root / "tokenizer_2", tmp_path / "alone" / "tokenizer_2")
    with pytest.raises(CheckpointError, match="shape"):
        load_t5(tmp_path / "alone")


@pytest.mark.parametrize("stored", [torch.float16, torch.float8_e4m3fn], ids=["fp16-file", "fp8-file"])
def test_files_in_other_dtypes_convert_on_load(snapshot, tmp_path, tokenizer_folder, stored):
    """A file stored in fp16 or fp8 loads into fp32: the same as the reference given the same rounded weights."""
    root, reference = snapshot
    rounded = {k: v.to(stored).contiguous() for k, v in reference.state_dict().items()}
    (tmp_path / "text_encoder_2").mkdir()
    save_file(rounded, tmp_path / "text_encoder_2" / "model.safetensors")
    shutil.copy(root / "text_encoder_2" / "config.json", tmp_path / "text_encoder_2")
    shutil.copytree(tokenizer_folder, tmp_path / "tokenizer_2")
    twin = reference_model(TINY)
    twin.load_state_dict({k: v.float() for k, v in rounded.items()})
    t5 = load_t5(tmp_path, dtype=torch.float32)
    assert t5.model.shared.weight.dtype == torch.float32
    ids = token_ids()
    with torch.no_grad():
        error = relative_error(t5.encode(ids), twin(ids).last_hidden_state)
    assert error <= 1e-5, f"max relative error {error:.2e}"
