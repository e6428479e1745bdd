"""Where each component's tensors are in a file or folder, the other layouts' names converted to the official
ones (as data: tables of renames), and the configurations read off the tensors.

The official names are Black Forest Labs' for the transformer and autoencoder and the Hugging Face on-disk
names for CLIP and T5, which our module trees spell. Converted here: diffusers' folders (their split
projections fused back, the final modulation's halves swapped), single files whose keys carry a prefix
(`model.diffusion_model.` in ComfyUI-style bundles), and CLIP files written without `text_model.`. Reading a
configuration off the tensors is one explicit function per component (`infer_flux_params`,
`infer_autoencoder_params`), never hidden in a model's constructor.
"""

import itertools
import math
import re
from pathlib import Path

import torch

from flux.modules.autoencoder import AutoEncoderParams
from flux.modules.transformer import FluxParams
from flux.weights.checkpoint import CheckpointError, read_json_object, read_safetensors, read_weights


WEIGHTS_HELP = "see weights/README.md for where the official files come from"


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
    _, config = read_model_config(path)
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


def check_layer_count(state_dict: dict[str, torch.Tensor], prefix: str, declared: int, *, source: Path) -> None:
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


def read_model_config(folder: Path) -> tuple[Path, dict]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json here ({WEIGHTS_HELP})")
    return path, read_json_object(path)
