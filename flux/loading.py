"""Loading the official FLUX.1 files, and the other layouts in circulation, into our modules.

Our module trees spell the official keys, so the official files need no renaming. Other layouts are
converted here, as data: diffusers' folders (tables of renames, with the fused projections they split),
single files whose keys carry a prefix (`model.diffusion_model.` from ComfyUI-style bundles), and any
floating dtype, fp8 included. Every model is built on `meta` and the file's tensors are assigned to it
(`flux.checkpoint.load_into`): no random initialisation, no second copy, and a `CheckpointError` that names
the file and the tensor for anything that does not fit.
"""

import contextlib
import dataclasses
import itertools
import math
import re
from pathlib import Path

import torch
from torch import nn

from flux.autoencoder import AutoEncoder, AutoEncoderParams
from flux.checkpoint import CheckpointError, load_into, read_json_object, read_safetensors, read_weights
from flux.clip import CLIP, CLIPTextConfig, CLIPTextModel
from flux.model import Flux, FluxParams
from flux.t5 import T5, T5Config, T5Encoder
from flux.tokenizers import CLIPTokenizer, T5Tokenizer

WEIGHTS_HELP = "see weights/README.md for where the official files come from"


# --------------------------------------------------------------------------------------------------
# The transformer
# --------------------------------------------------------------------------------------------------

def load_flow_model(path, *, device="cpu", dtype=torch.bfloat16) -> Flux:
    """The FLUX transformer from a single file, a diffusers `transformer/` folder, or a snapshot folder.

    The configuration (depths, width, channels, guidance embedding) is read off the weights, so
    community checkpoints of other depths and the 128/384-channel Fill/Canny/Depth variants load too.
    fp8 files are converted to `dtype`, ComfyUI's scaled fp8 ones as weight · scale_weight. To keep them in
    fp8 instead, `dtype=torch.float8_e4m3fn` stores the blocks' Linear weights in fp8 and the rest in bf16;
    `flux.fp8.load_fp8_flow_model` does the same with the rest, and the arithmetic, in a dtype of your choice.
    """
    from flux import fp8  # here rather than at the top: flux.fp8 builds on this module

    if dtype == fp8.FP8:
        return fp8.load_fp8_flow_model(path, device=device, dtype=torch.bfloat16)
    state_dict, source = read_flow_checkpoint(Path(path))
    state_dict = fp8.dequantize_scaled(state_dict, source=source, dtype=dtype)
    params = infer_flux_params(state_dict, source=source)
    with torch.device("meta"):
        model = Flux(params)
    return load_into(model, state_dict, source=source, device=device, dtype=dtype).eval().requires_grad_(False)


def read_flow_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The transformer's tensors under our (official) names, and the file or folder they came from."""
    if not path.exists():
        raise CheckpointError(f"{path}: not found; pass a flux1-*.safetensors file or a FLUX.1 repository folder ({WEIGHTS_HELP})")
    if path.is_file():
        return to_official_names(read_safetensors(path), source=path), path
    if _is_diffusers_folder(path):
        return to_official_names(read_weights(path, "diffusion_pytorch_model"), source=path), path
    # A snapshot holds the transformer twice; the single file is one read instead of three shards.
    singles = sorted(p for p in path.glob("*.safetensors") if p.name != "ae.safetensors")
    if len(singles) > 1:
        singles = [p for p in singles if p.name.startswith("flux1-")] or singles
    if len(singles) == 1:
        return to_official_names(read_safetensors(singles[0]), source=singles[0]), singles[0]
    if len(singles) > 1:
        raise CheckpointError(f"{path}: several transformer files, {[p.name for p in singles]}; pass the one to load")
    if _is_diffusers_folder(path / "transformer"):
        folder = path / "transformer"
        return to_official_names(read_weights(folder, "diffusion_pytorch_model"), source=folder), folder
    raise CheckpointError(
        f"{path}: no FLUX transformer here: expected flux1-*.safetensors or a transformer/ folder with "
        f"config.json and diffusion_pytorch_model*.safetensors ({WEIGHTS_HELP})"
    )


def _is_diffusers_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("diffusion_pytorch_model*.safetensors*"))


def to_official_names(state_dict: dict[str, torch.Tensor], *, source: Path) -> dict[str, torch.Tensor]:
    """Strips a key prefix and converts diffusers' names; official-layout dicts pass through unchanged."""
    anchor = next((k for k in state_dict if k.endswith(("img_in.weight", "x_embedder.weight"))), None)
    if anchor is None:
        raise CheckpointError(f"{source}: not a FLUX transformer (no 'img_in.weight' nor 'x_embedder.weight' tensor)")
    prefix = anchor[: -len("img_in.weight")] if anchor.endswith("img_in.weight") else anchor[: -len("x_embedder.weight")]
    if prefix:
        # A bundle (transformer + autoencoder + text encoders in one file): keep the transformer's part.
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if "x_embedder.weight" in state_dict:
        state_dict = from_diffusers(state_dict, source=source)
    return state_dict


# Our name <- diffusers' name, for whole modules (both `.weight` and `.bias` follow). `{i}` is a block index.
DIFFUSERS_MODULES = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "double_blocks.{i}.img_mod.lin": "transformer_blocks.{i}.norm1.linear",
    "double_blocks.{i}.txt_mod.lin": "transformer_blocks.{i}.norm1_context.linear",
    "double_blocks.{i}.img_attn.proj": "transformer_blocks.{i}.attn.to_out.0",
    "double_blocks.{i}.txt_attn.proj": "transformer_blocks.{i}.attn.to_add_out",
    "double_blocks.{i}.img_mlp.0": "transformer_blocks.{i}.ff.net.0.proj",
    "double_blocks.{i}.img_mlp.2": "transformer_blocks.{i}.ff.net.2",
    "double_blocks.{i}.txt_mlp.0": "transformer_blocks.{i}.ff_context.net.0.proj",
    "double_blocks.{i}.txt_mlp.2": "transformer_blocks.{i}.ff_context.net.2",
    "single_blocks.{i}.modulation.lin": "single_transformer_blocks.{i}.norm.linear",
    "single_blocks.{i}.linear2": "single_transformer_blocks.{i}.proj_out",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # halves stored as (scale, shift): swapped below
}
# Our fused projections <- diffusers' separate ones, concatenated along the output dimension.
DIFFUSERS_FUSED = {
    "double_blocks.{i}.img_attn.qkv": [f"transformer_blocks.{{i}}.attn.to_{x}" for x in "qkv"],
    "double_blocks.{i}.txt_attn.qkv": [f"transformer_blocks.{{i}}.attn.add_{x}_proj" for x in "qkv"],
    "single_blocks.{i}.linear1": [f"single_transformer_blocks.{{i}}.attn.to_{x}" for x in "qkv"]
    + ["single_transformer_blocks.{i}.proj_mlp"],
}
# Single tensors whose last name part changes too.
DIFFUSERS_TENSORS = {
    "double_blocks.{i}.img_attn.norm.query_norm.scale": "transformer_blocks.{i}.attn.norm_q.weight",
    "double_blocks.{i}.img_attn.norm.key_norm.scale": "transformer_blocks.{i}.attn.norm_k.weight",
    "double_blocks.{i}.txt_attn.norm.query_norm.scale": "transformer_blocks.{i}.attn.norm_added_q.weight",
    "double_blocks.{i}.txt_attn.norm.key_norm.scale": "transformer_blocks.{i}.attn.norm_added_k.weight",
    "single_blocks.{i}.norm.query_norm.scale": "single_transformer_blocks.{i}.attn.norm_q.weight",
    "single_blocks.{i}.norm.key_norm.scale": "single_transformer_blocks.{i}.attn.norm_k.weight",
}


def diffusers_name_table(num_double: int, num_single: int) -> dict[str, list[str]]:
    """Every official tensor name -> the diffusers tensor names it is made of (several for fused ones)."""
    def expand(template: str) -> list[str]:
        if "{i}" not in template:
            return [template]
        count = num_double if template.startswith(("double_blocks", "transformer_blocks")) else num_single
        return [template.replace("{i}", str(i)) for i in range(count)]

    table = {}
    for ours, theirs in DIFFUSERS_MODULES.items():
        for suffix in (".weight", ".bias"):
            for i_ours, i_theirs in zip(expand(ours), expand(theirs)):
                table[i_ours + suffix] = [i_theirs + suffix]
    for ours, parts in DIFFUSERS_FUSED.items():
        for suffix in (".weight", ".bias"):
            for index, name in enumerate(expand(ours)):
                table[name + suffix] = [p.replace("{i}", str(index)) + suffix for p in parts]
    for ours, theirs in DIFFUSERS_TENSORS.items():
        for i_ours, i_theirs in zip(expand(ours), expand(theirs)):
            table[i_ours] = [i_theirs]
    return table


def from_diffusers(state_dict: dict[str, torch.Tensor], *, source: Path) -> dict[str, torch.Tensor]:
    """diffusers' `FluxTransformer2DModel` tensors -> the official names."""
    table = diffusers_name_table(_count_blocks(state_dict, "transformer_blocks", source),
                                 _count_blocks(state_dict, "single_transformer_blocks", source))
    converted, used = {}, set()
    for ours, theirs in table.items():
        present = [name for name in theirs if name in state_dict]
        if not present:
            continue  # e.g. no guidance embedder, or no biases: load_into reports what the model misses
        if len(present) != len(theirs):
            missing = sorted(set(theirs) - set(present))
            raise CheckpointError(f"{source}: has {present[0]!r} but not {missing}, which together make {ours!r}")
        tensor = torch.cat([state_dict[name] for name in theirs]) if len(theirs) > 1 else state_dict[theirs[0]]
        if ours.startswith("final_layer.adaLN_modulation"):
            scale, shift = tensor.chunk(2)
            tensor = torch.cat([shift, scale])
        converted[ours] = tensor
        used.update(theirs)
    unknown = [name for name in state_dict if name not in used]
    if unknown:
        raise CheckpointError(f"{source}: diffusers tensors with no official counterpart: {unknown[:8]}")
    return converted


def infer_flux_params(state_dict: dict[str, torch.Tensor], *, source) -> FluxParams:
    """Reads the transformer's configuration off its (official-named) tensors.

    Not stored in the file: the rotary split (16, 56, 56) and theta, which every released FLUX variant
    shares; we require the head dim they imply (128).
    """
    def shape(name: str) -> tuple[int, ...]:
        if name not in state_dict:
            raise CheckpointError(f"{source}: missing tensor {name!r}, needed to read the model's configuration")
        return tuple(state_dict[name].shape)

    hidden, in_channels = shape("img_in.weight")
    depth = _count_blocks(state_dict, "double_blocks", source)
    head_dim = shape(f"{'double_blocks.0.img_attn' if depth else 'single_blocks.0'}.norm.query_norm.scale")[0]
    if head_dim != 128 or hidden % head_dim:
        raise CheckpointError(f"{source}: head dim {head_dim} with hidden size {hidden}; FLUX models have head dim 128")
    mlp_hidden = shape("double_blocks.0.img_mlp.0.weight")[0] if depth else shape("single_blocks.0.linear1.weight")[0] - 3 * hidden
    return FluxParams(
        in_channels=in_channels,
        out_channels=shape("final_layer.linear.weight")[0],
        vec_in_dim=shape("vector_in.in_layer.weight")[1],
        context_in_dim=shape("txt_in.weight")[1],
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=_count_blocks(state_dict, "single_blocks", source),
        axes_dim=(16, 56, 56),
        theta=10_000,
        qkv_bias=depth == 0 or "double_blocks.0.img_attn.qkv.bias" in state_dict,
        guidance_embed="guidance_in.in_layer.weight" in state_dict,
    )


def _count_blocks(state_dict: dict[str, torch.Tensor], prefix: str, source) -> int:
    # At most 9 digits: a longer "index" is no block of any model (and a 5000-digit one would not even parse).
    indices = {int(m.group(1)) for k in state_dict if (m := re.match(rf"{prefix}\.(\d{{1,9}})\.", k))}
    if indices and max(indices) != len(indices) - 1:  # distinct and from 0: all of 0..max, or some missing
        missing = itertools.islice((i for i in itertools.count() if i not in indices), 8)  # not all up to the max
        raise CheckpointError(f"{source}: the {prefix} are not numbered 0..{max(indices)}: missing {list(missing)}")
    return len(indices)


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


def read_autoencoder_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], Path, dict]:
    """The autoencoder's tensors under the official names, the file or folder they came from, and the
    diffusers config (empty for a single file)."""
    if not path.exists():
        raise CheckpointError(f"{path}: not found; pass ae.safetensors, a diffusers vae/ folder or a FLUX.1 repository folder ({WEIGHTS_HELP})")
    if path.is_dir() and not _is_diffusers_folder(path):
        # A snapshot holds the autoencoder twice; prefer the official single file, one read with no renaming.
        if (path / "ae.safetensors").is_file():
            path = path / "ae.safetensors"
        elif _is_diffusers_folder(path / "vae"):
            path = path / "vae"
        else:
            raise CheckpointError(f"{path}: no FLUX autoencoder here: expected ae.safetensors or a vae/ folder with "
                                  f"config.json and diffusion_pytorch_model.safetensors ({WEIGHTS_HELP})")
    if path.is_file():
        return autoencoder_official_names(read_safetensors(path), source=path), path, {}
    _, config = _read_model_config(path)
    return autoencoder_official_names(read_weights(path, "diffusion_pytorch_model"), source=path), path, config


def autoencoder_official_names(state_dict: dict[str, torch.Tensor], *, source: Path) -> dict[str, torch.Tensor]:
    """diffusers' `AutoencoderKL` tensors -> the official names; official-layout dicts pass through unchanged."""
    if "encoder.conv_in.weight" not in state_dict:
        raise CheckpointError(f"{source}: not an autoencoder (no 'encoder.conv_in.weight' tensor)")
    if not any(name.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for name in state_dict):
        return state_dict
    levels = _count_blocks(state_dict, r"encoder\.down_blocks", source)
    blocks = _count_blocks(state_dict, r"decoder\.up_blocks\.0\.resnets", source)
    converted, used = {}, set()
    for ours, theirs in autoencoder_diffusers_name_table(levels, blocks).items():
        if theirs not in state_dict:
            continue  # absent shortcuts and downsamplers; load_into reports what the model misses
        tensor = state_dict[theirs]
        if ".attn_1." in ours and ours.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # diffusers' linear (C, C) -> the official 1×1 convolution (C, C, 1, 1)
        converted[ours] = tensor
        used.add(theirs)
    unknown = [name for name in state_dict if name not in used]
    if unknown:
        raise CheckpointError(f"{source}: diffusers autoencoder tensors with no official counterpart "
                              f"(a quant_conv means it is not FLUX's autoencoder): {unknown[:8]}")
    return converted


# Our autoencoder module <- diffusers' (`AutoencoderKL`). `{half}` is encoder or decoder, `{i}` a level and `{j}`
# a block in it, `{resnet}` and `{attention}` a layer of a ResNet block and of the attention (table below).
AUTOENCODER_DIFFUSERS_MODULES = {
    "{half}.conv_in": "{half}.conv_in",
    "{half}.norm_out": "{half}.conv_norm_out",
    "{half}.conv_out": "{half}.conv_out",
    "{half}.mid.block_1.{resnet}": "{half}.mid_block.resnets.0.{resnet}",
    "{half}.mid.attn_1.{attention}": "{half}.mid_block.attentions.0.{attention}",
    "{half}.mid.block_2.{resnet}": "{half}.mid_block.resnets.1.{resnet}",
    "encoder.down.{i}.block.{j}.{resnet}": "encoder.down_blocks.{i}.resnets.{j}.{resnet}",
    "encoder.down.{i}.downsample.conv": "encoder.down_blocks.{i}.downsamplers.0.conv",
    # diffusers numbers the decoder's levels in the order they run (lowest resolution first), the official
    # file by resolution like the encoder's (up.0 is full size): up.{i} is up_blocks.{levels - 1 - i}.
    "decoder.up.{i}.block.{j}.{resnet}": "decoder.up_blocks.{reversed_i}.resnets.{j}.{resnet}",
    "decoder.up.{i}.upsample.conv": "decoder.up_blocks.{reversed_i}.upsamplers.0.conv",
}
AUTOENCODER_DIFFUSERS_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                                "nin_shortcut": "conv_shortcut"}
AUTOENCODER_DIFFUSERS_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def autoencoder_diffusers_name_table(levels: int, blocks: int) -> dict[str, str]:
    """Every official autoencoder tensor name a model of this size may have -> diffusers' name for it."""
    table = {}
    for ours, theirs in AUTOENCODER_DIFFUSERS_MODULES.items():
        for half, i, j, (resnet_ours, resnet_theirs), (attention_ours, attention_theirs) in itertools.product(
            ("encoder", "decoder"), range(levels), range(blocks),
            AUTOENCODER_DIFFUSERS_RESNET.items(), AUTOENCODER_DIFFUSERS_ATTENTION.items(),
        ):
            common = dict(half=half, i=i, reversed_i=levels - 1 - i, j=j)
            for suffix in (".weight", ".bias"):
                table[ours.format(**common, resnet=resnet_ours, attention=attention_ours) + suffix] = (
                    theirs.format(**common, resnet=resnet_theirs, attention=attention_theirs) + suffix)
    return table


def infer_autoencoder_params(state_dict: dict[str, torch.Tensor], config: dict, *, source) -> AutoEncoderParams:
    """Reads the autoencoder's configuration off its (official-named) tensors, and the latent scale and shift
    from a diffusers `config`; checks that the two agree where both speak."""
    def shape(name: str) -> tuple[int, ...]:
        if name not in state_dict:
            raise CheckpointError(f"{source}: missing tensor {name!r}, needed to read the autoencoder's configuration")
        return tuple(state_dict[name].shape)

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = _count_blocks(state_dict, r"encoder\.down", source)
    widths = [shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)]
    if levels == 0 or any(width % ch for width in widths):
        raise CheckpointError(f"{source}: level widths {widths} are not multiples of the first convolution's {ch} channels")
    z_channels = shape("decoder.conv_in.weight")[1]
    if shape("encoder.conv_out.weight")[0] != 2 * z_channels:
        raise CheckpointError(f"{source}: the encoder predicts {shape('encoder.conv_out.weight')[0]} channels, expected "
                              f"2 × {z_channels} (mean and log-variance of the decoder's {z_channels} latent channels)")
    num_res_blocks = _count_blocks(state_dict, r"encoder\.down\.0\.block", source)
    fields = dict(in_channels=in_channels, ch=ch, out_ch=shape("decoder.conv_out.weight")[0],
                  ch_mult=tuple(width // ch for width in widths), num_res_blocks=num_res_blocks, z_channels=z_channels)
    implied = {"in_channels": in_channels, "out_channels": fields["out_ch"], "latent_channels": z_channels,
               "layers_per_block": num_res_blocks, "block_out_channels": widths}
    for name, value in implied.items():
        if name in config and config[name] != value:
            raise CheckpointError(f"{source}: config.json gives {name} = {config[name]} but the weights imply {value}")
    # Neither ae.safetensors nor the weights hold the latent statistics: FLUX's unless a config says otherwise.
    flux = AutoEncoderParams()
    scale = config.get("scaling_factor") if config.get("scaling_factor") is not None else flux.scale_factor
    shift = config.get("shift_factor") if config.get("shift_factor") is not None else flux.shift_factor
    for name, value in (("scaling_factor", scale), ("shift_factor", shift)):
        if type(value) not in (int, float) or not math.isfinite(value):
            raise CheckpointError(f"{source}: config.json gives {name} = {value!r:.80}; expected a finite number")
    if scale == 0:  # latents are divided by it
        raise CheckpointError(f"{source}: config.json gives scaling_factor = 0; expected a non-zero number (FLUX's is 0.3611)")
    try:
        return AutoEncoderParams(**fields, scale_factor=float(scale), shift_factor=float(shift))
    except ValueError as error:
        raise CheckpointError(f"{source}: not a valid autoencoder configuration: {error}") from None


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
    _check_layer_count(state_dict, "encoder.block", config.num_layers, source=folder)
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
    _check_layer_count(state_dict, "text_model.encoder.layers", config.num_hidden_layers, source=folder)
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


def _check_layer_count(state_dict: dict[str, torch.Tensor], prefix: str, declared: int, *, source: Path) -> None:
    """Before the model is built: config.json may declare any number of layers, and building millions of them,
    even on `meta`, takes minutes."""
    found = _count_blocks(state_dict, re.escape(prefix), source)
    if found != declared:
        raise CheckpointError(f"{source}: config.json declares {declared} layers, but the weights hold {found} "
                              f"({prefix}.0, ...); the two do not belong together")


def clip_official_names(state_dict: dict[str, torch.Tensor], *, source: Path) -> dict[str, torch.Tensor]:
    """CLIP tensors under the official `text_model.` names: transformers 4 (the official file) wrote them so,
    transformers 5 without the prefix. The stored `position_ids` (0..76, a buffer, not a weight) is dropped."""
    prefixed = [name.startswith("text_model.") for name in state_dict]
    if any(prefixed) and not all(prefixed):
        odd = [name for name, has in zip(state_dict, prefixed) if not has]
        raise CheckpointError(f"{source}: some tensor names start with 'text_model.' and some do not "
                              f"(e.g. {odd[:3]}); the file mixes two layouts")
    prefix = "" if all(prefixed) else "text_model."
    return {prefix + name: tensor for name, tensor in state_dict.items()
            if not name.endswith("embeddings.position_ids")}


def read_t5_config(folder: Path) -> T5Config:
    """The T5Config a transformers `config.json` describes; only T5 v1.1's gated-GELU encoder is accepted."""
    path, config = _read_model_config(folder)
    if config.get("feed_forward_proj", "relu") != "gated-gelu":
        raise CheckpointError(f"{path}: feed_forward_proj is {config.get('feed_forward_proj', 'relu')!r}; "
                              "FLUX.1 uses T5 v1.1, whose feed-forward is 'gated-gelu'")
    return _config_from(path, config, T5Config, defaults=dict(
        relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6))


def read_clip_config(folder: Path) -> CLIPTextConfig:
    """The CLIPTextConfig a transformers `config.json` describes (text tower only, quick-GELU)."""
    path, config = _read_model_config(folder)
    if config.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise CheckpointError(f"{path}: hidden_act is {config['hidden_act']!r}; CLIP ViT-L/14 was trained with "
                              "'quick_gelu', and FLUX.1's text_encoder uses it")
    # transformers pools at argmax(input_ids) when the config says eos_token_id 2 (the original CLIP configs'
    # error; the true end-of-text id is 49407, the largest): we do the same, spelled as None.
    eos = config.get("eos_token_id", 2)
    return _config_from(path, {**config, "eos_token_id": None if eos == 2 else eos}, CLIPTextConfig,
                        defaults=dict(max_position_embeddings=77, layer_norm_eps=1e-5))


def _read_model_config(folder: Path) -> tuple[Path, dict]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json here ({WEIGHTS_HELP})")
    return path, read_json_object(path)


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
