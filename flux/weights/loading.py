"""`load_flow_model`, `load_autoencoder`, `load_t5`, `load_clip`: a file or folder in, a built module out.

Each is a small dispatcher: find the component's tensors (flux/weights/layouts.py: the official layout, diffusers
folders, prefixed single files), read its configuration off them, and hand the tensors to the storage they
ask for (a plain dtype; fp8 kept fp8 by flux/weights/fp8.py). Every model is built on `meta` and the file's
tensors are assigned to it (`flux.weights.checkpoint.load_into`): no random initialisation, no second copy,
and a `CheckpointError` that names the file and the tensor for anything that does not fit.
"""

import contextlib
import dataclasses
from pathlib import Path

import torch
from torch import nn

from flux.modules.autoencoder import AutoEncoder
from flux.modules.clip import CLIP, CLIPTextConfig, CLIPTextModel
from flux.modules.t5 import T5, T5Config, T5Encoder
from flux.modules.transformer import Flux
from flux.weights import fp8, gguf
from flux.weights.checkpoint import CheckpointError, load_into, read_weights
from flux.weights.layouts import (
    WEIGHTS_HELP,
    check_layer_count,
    clip_official_names,
    infer_autoencoder_params,
    infer_flux_params,
    read_autoencoder_checkpoint,
    read_flow_checkpoint,
    read_model_config,
)
from flux.weights.tokenizers import CLIPTokenizer, T5Tokenizer


# --------------------------------------------------------------------------------------------------
# The transformer
# --------------------------------------------------------------------------------------------------

def load_flow_model(path, *, device="cpu", dtype=torch.bfloat16) -> Flux:
    """The FLUX transformer from a single file, a diffusers `transformer/` folder, or a snapshot folder.

    The configuration (depths, width, channels, guidance embedding) is read off the weights, so
    community checkpoints of other depths and the 128/384-channel Fill/Canny/Depth variants load too.
    fp8 files are converted to `dtype`, ComfyUI's scaled fp8 ones as weight · scale_weight. To keep them in
    fp8 instead, `dtype=torch.float8_e4m3fn` stores the blocks' Linear weights in fp8 and the rest in bf16;
    `flux.weights.fp8.load_fp8_flow_model` does the same with the rest, and the arithmetic, in a dtype of your choice.
    A `.gguf` file (flux/weights/gguf.py) keeps its blocks' quantized weights quantized and computes in `dtype`.
    """
    if is_gguf(Path(path)):
        if dtype == fp8.FP8:
            raise ValueError(f"{path}: a GGUF file keeps its own quantization; pass the compute dtype "
                             "(torch.bfloat16, float16 or float32), not float8_e4m3fn")
        return gguf.load_gguf_flow_model(path, device=device, dtype=dtype)
    if dtype == fp8.FP8:
        return fp8.load_fp8_flow_model(path, device=device, dtype=torch.bfloat16)
    state_dict, source = read_flow_checkpoint(Path(path))
    state_dict = fp8.dequantize_scaled(state_dict, source=source, dtype=dtype)
    params = infer_flux_params(state_dict, source=source)
    with torch.device("meta"):
        model = Flux(params)
    return load_into(model, state_dict, source=source, device=device, dtype=dtype).eval().requires_grad_(False)


def is_gguf(path: Path) -> bool:
    """A `.gguf` file, or any file starting with GGUF's magic: told by its contents, as a renamed file may be."""
    if path.suffix.lower() == ".gguf":
        return True
    if not path.is_file():  # a folder, or nothing there
        return False
    try:
        with open(path, "rb") as file:
            return file.read(4) == gguf.MAGIC
    except OSError:  # unreadable: the safetensors reader reports it
        return False


# --------------------------------------------------------------------------------------------------
# The autoencoder
# --------------------------------------------------------------------------------------------------

def load_autoencoder(path, *, device="cpu", dtype=torch.bfloat16) -> AutoEncoder:
    """The FLUX autoencoder from `ae.safetensors`, a diffusers `vae/` folder, or a snapshot folder.

    The structure (widths, levels, blocks, channels) is read off the weights; the latent scale and shift,
    which no weight file holds, from a diffusers `config.json` when there is one, else FLUX's own.
    """
    state_dict, source, config = read_autoencoder_checkpoint(Path(path))
    params = infer_autoencoder_params(state_dict, config, source=source)
    with torch.device("meta"):
        model = AutoEncoder(params)
    return load_into(model, state_dict, source=source, device=device, dtype=dtype).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# The text encoders
# --------------------------------------------------------------------------------------------------
# Both come as Hugging Face folders: `text_encoder_2/` (T5) and `text_encoder/` (CLIP), each a config.json
# and a model.safetensors (or shards with an index), their tokenizers in the sibling `tokenizer_2/` and
# `tokenizer/` (or, in folders people assemble themselves, inside the component folder).

def load_t5(path, *, max_length=256, device="cpu", dtype=torch.bfloat16) -> T5:
    """T5 with its tokenizer, from `text_encoder_2/` or the snapshot root: prompts -> (B, max_length, 4096).

    `max_length` is the padded prompt length: 256 for FLUX.1-schnell, 512 for dev.
    """
    folder = _text_encoder_folder(Path(path), "text_encoder_2", "T5")
    config = read_t5_config(folder)
    tokenizer_folder = _tokenizer_folder(folder, "tokenizer_2", ("tokenizer.json", "spiece.model"))
    tokenizer = T5Tokenizer.from_folder(tokenizer_folder, max_length=max_length)
    _check_vocabulary_fits(tokenizer, config.vocab_size, tokenizer_folder=tokenizer_folder, folder=folder)
    state_dict = read_weights(folder, "model")
    # transformers ties the encoder's embedding to `shared`; files written with the tie unrolled store it twice.
    state_dict.pop("encoder.embed_tokens.weight", None)
    check_layer_count(state_dict, "encoder.block", config.num_layers, source=folder)
    with shapes_only():
        model = T5Encoder(config)
    load_into(model, state_dict, source=folder, device=device, dtype=dtype)
    if dtype == torch.float16:  # as transformers loads T5 in fp16: these outputs overflow fp16 (see t5.py)
        for block in model.encoder.block:
            block.layer[1].DenseReluDense.wo.float()
    return T5(model, tokenizer).eval().requires_grad_(False)


def load_clip(path, *, device="cpu", dtype=torch.bfloat16) -> CLIP:
    """CLIP's text tower with its tokenizer, from `text_encoder/` or the snapshot root: prompts -> (B, 768)."""
    folder = _text_encoder_folder(Path(path), "text_encoder", "CLIP")
    config = read_clip_config(folder)
    tokenizer_folder = _tokenizer_folder(folder, "tokenizer", ("tokenizer.json", "vocab.json"))
    tokenizer = CLIPTokenizer.from_folder(tokenizer_folder, max_length=config.max_position_embeddings)
    _check_vocabulary_fits(tokenizer, config.vocab_size, tokenizer_folder=tokenizer_folder, folder=folder)
    state_dict = clip_official_names(read_weights(folder, "model"), source=folder)
    check_layer_count(state_dict, "text_model.encoder.layers", config.num_hidden_layers, source=folder)
    with shapes_only():
        model = CLIPTextModel(config)
    load_into(model, state_dict, source=folder, device=device, dtype=dtype)
    return CLIP(model, tokenizer).eval().requires_grad_(False)


@contextlib.contextmanager
def shapes_only():
    """Builds modules on `meta` (shapes, no memory) without nn.Embedding's random initialisation: on `meta`
    its `normal_` runs a Python decomposition whose first call imports torch._dynamo, a second or more of
    the load for values that `load_into` replaces anyway."""
    reset = nn.Embedding.reset_parameters
    nn.Embedding.reset_parameters = lambda self: None
    try:
        with torch.device("meta"):
            yield
    finally:
        nn.Embedding.reset_parameters = reset


def _check_vocabulary_fits(tokenizer, vocab_size: int, *, tokenizer_folder: Path, folder: Path) -> None:
    """Every id the tokenizer can produce needs a row in the encoder's embedding, or the first prompt that
    uses one fails deep inside the model."""
    largest = max(tokenizer.backend.get_vocab(with_added_tokens=True).values())
    if largest >= vocab_size:
        raise CheckpointError(f"{tokenizer_folder}: the tokenizer's ids go up to {largest}, but {folder / 'config.json'} "
                              f"gives the encoder {vocab_size} embeddings; the tokenizer and the model do not belong together")


def read_t5_config(folder: Path) -> T5Config:
    """The T5Config a transformers `config.json` describes; only T5 v1.1's gated-GELU encoder is accepted."""
    path, config = read_model_config(folder)
    if config.get("feed_forward_proj", "relu") != "gated-gelu":
        raise CheckpointError(f"{path}: feed_forward_proj is {config.get('feed_forward_proj', 'relu')!r}; "
                              "FLUX.1 uses T5 v1.1, whose feed-forward is 'gated-gelu'")
    return _config_from(path, config, T5Config, defaults=dict(
        relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6))


def read_clip_config(folder: Path) -> CLIPTextConfig:
    """The CLIPTextConfig a transformers `config.json` describes (text tower only, quick-GELU)."""
    path, config = read_model_config(folder)
    if config.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise CheckpointError(f"{path}: hidden_act is {config['hidden_act']!r}; CLIP ViT-L/14 was trained with "
                              "'quick_gelu', and FLUX.1's text_encoder uses it")
    # transformers pools at argmax(input_ids) when the config says eos_token_id 2 (the original CLIP configs'
    # error; the true end-of-text id is 49407, the largest): we do the same, spelled as None.
    eos = config.get("eos_token_id", 2)
    return _config_from(path, {**config, "eos_token_id": None if eos == 2 else eos}, CLIPTextConfig,
                        defaults=dict(max_position_embeddings=77, layer_norm_eps=1e-5))


def _config_from(path: Path, config: dict, cls, *, defaults: dict):
    """`cls` (a config dataclass) from the JSON fields of the same names; errors name the file and field."""
    values = {}
    for field in dataclasses.fields(cls):
        if field.name in config:
            value = config[field.name]
        elif field.name in defaults:
            value = defaults[field.name]
        else:
            raise CheckpointError(f"{path}: the field {field.name!r} is missing")
        if field.name.endswith(("epsilon", "_eps")) and type(value) is int:
            value = float(value)  # JSON writes 1.0 as 1
        values[field.name] = value
    try:
        return cls(**values)
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None


def _text_encoder_folder(path: Path, name: str, model: str) -> Path:
    """`path` itself when it holds config.json (a component folder), else its `name/` (a snapshot root)."""
    if not path.exists():
        raise CheckpointError(f"{path}: not found; pass the {name}/ folder or a FLUX.1 repository folder ({WEIGHTS_HELP})")
    if not path.is_dir():
        raise CheckpointError(f"{path}: the {model} encoder is a folder ({name}/ with config.json and model weights), not a file")
    if (path / "config.json").is_file() or not (path / name).is_dir():
        return path  # reading config.json reports it when it is missing
    return path / name


def _tokenizer_folder(folder: Path, name: str, markers: tuple[str, ...]) -> Path:
    """The tokenizer beside the encoder: inside its folder when there (files a user gathered in one place),
    else the repository's sibling `name/` folder."""
    for candidate in (folder, folder.parent / name):
        if any((candidate / marker).is_file() for marker in markers):
            return candidate
    raise CheckpointError(f"{folder}: no tokenizer found, neither in this folder nor in {folder.parent / name} "
                          f"(expected {' or '.join(markers)}); the repository keeps it in {name}/")
