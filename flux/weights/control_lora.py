"""What Black Forest Labs' control LoRAs carry besides low-rank pairs, applied to a built model from outside.

`flux1-canny-dev-lora.safetensors` and `flux1-depth-dev-lora.safetensors` turn the base FLUX.1-dev transformer
into a Canny/Depth one (../shared/manifests/README.md, "The FLUX.1 family"). Besides a pair (A, B) with a bias
on B for every Linear (flux.weights.lora reads those), they hold
- an `img_in` pair whose A takes 128 input channels: the 64 noisy-latent channels and the control image's 64.
  The base img_in is widened to 128 inputs first, its new columns zero, so the base model sees nothing of the
  control channels and the LoRA alone reads them (Black Forest Labs' `optionally_expand_state_dict` and
  diffusers' `_maybe_expand_transformer_param_shape_or_error_` do the same);
- full replacement tensors for every attention's RMSNorm scales (`...query_norm.scale`, `...key_norm.scale`;
  diffusers' `norm_q`, `norm_k`, `norm_added_q`, `norm_added_k`), which replace the model's whatever the LoRA's
  strength, as both references load them.
Unloading gives back the original tensors and img_in, bit for bit. The originals are kept in a plain attribute
of the model (`CONTROL_ORIGINALS`), so the module tree and its state dict are those of the model as it is now.
"""

from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from flux.modules.transformer import Flux
from flux.weights.checkpoint import CheckpointError
from flux.weights.layouts import diffusers_name_table

CONTROL_ORIGINALS = "control_lora_originals"  # {"params": FluxParams, "img_in.weight": Parameter, name: Parameter}
WIDENABLE = "img_in"  # the one Linear a LoRA may widen: its inputs are the per-token channels
NORM_SCALES = (".query_norm.scale", ".key_norm.scale")


def split_full_tensors(model: Flux, tensors: dict[str, Tensor], *, source: Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A LoRA file's tensors -> (full replacement tensors under our parameter names, the rest). Each full
    tensor is checked against the parameter it replaces."""
    names = _full_tensor_names(model)
    parameters = dict(model.named_parameters())
    full, rest = {}, {}
    for key, tensor in tensors.items():
        if key not in names:
            rest[key] = tensor
            continue
        ours = names[key]
        if tuple(tensor.shape) != tuple(parameters[ours].shape):
            raise CheckpointError(f"{source}: {key!r} has shape {tuple(tensor.shape)}, but it replaces {ours}, "
                                  f"of shape {tuple(parameters[ours].shape)}")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{source}: {key!r} holds NaN or infinite values")
        full[ours] = tensor
    return full, rest


def check_widening(model: Flux, module: str, in_features: int, *, key: str, source: Path) -> None:
    """A pair whose A takes more inputs than its Linear has is allowed on img_in only, and only on a plain one."""
    linear = model.get_submodule(module)
    if module != WIDENABLE:
        raise CheckpointError(f"{source}: {key!r} takes {in_features} input features, but {module} has "
                              f"{linear.in_features}; only img_in may be widened by a LoRA (control LoRAs)")
    if type(linear) is not nn.Linear:
        raise CheckpointError(f"{source}: {key!r} needs img_in widened to {in_features} inputs, but img_in is a "
                              f"{type(linear).__name__}; load the model with plain weights to use a control LoRA")
    lora = getattr(linear, "lora", None)
    if lora is not None and any(update.A.shape[1] != in_features for update in lora.updates):
        raise CheckpointError(f"{source}: {key!r} needs img_in widened to {in_features} inputs, but a LoRA already "
                              "loaded on img_in takes its current inputs; unload it first")


def apply(model: Flux, *, full: dict[str, Tensor], img_in_features: int | None) -> None:
    """Widens img_in to `img_in_features` inputs (None: as it is) and puts in the full tensors, keeping the
    originals for `restore`. Call only after every check has passed."""
    originals = model.__dict__.setdefault(CONTROL_ORIGINALS, {})
    linear = model.img_in
    if img_in_features is not None and img_in_features > linear.in_features:
        originals.setdefault("params", model.params)
        originals.setdefault("img_in.weight", linear.weight)
        old = linear.weight
        wide = torch.zeros(old.shape[0], img_in_features, dtype=old.dtype, device=old.device)  # (hidden, 128)
        wide[:, : old.shape[1]] = old  # the new input columns are zero: the base model ignores them
        linear.weight = nn.Parameter(wide, requires_grad=False)
        linear.in_features = img_in_features
        model.params = replace(model.params, in_channels=img_in_features)  # Flux checks its inputs against it
    for name, tensor in full.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        old = getattr(module, leaf)
        originals.setdefault(name, old)  # the first load's original, if several files replace it
        setattr(module, leaf, nn.Parameter(tensor.to(dtype=old.dtype, device=old.device), requires_grad=False))


def restore(model: nn.Module) -> None:
    """Undoes `apply`: img_in, the model's params and every replaced tensor are the originals again."""
    originals = model.__dict__.pop(CONTROL_ORIGINALS, {})
    params = originals.pop("params", None)
    for name, old in originals.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        current = getattr(module, leaf)
        setattr(module, leaf, old if old.device == current.device else nn.Parameter(old.to(current.device), requires_grad=False))
        if name == f"{WIDENABLE}.weight":
            module.in_features = old.shape[1]
    if params is not None:
        model.params = params


def carries_full_tensors(model: nn.Module) -> bool:
    return bool(model.__dict__.get(CONTROL_ORIGINALS))


def _full_tensor_names(model: Flux) -> dict[str, str]:
    """Every key a LoRA file may give a full RMSNorm scale under -> our parameter name: the official names
    (Black Forest Labs' files, ComfyUI's `diffusion_model.` prefix) and diffusers' (`transformer.` prefix)."""
    table = diffusers_name_table(model.params.depth, model.params.depth_single_blocks)
    names = {}
    for name, _ in model.named_parameters():
        if name.endswith(NORM_SCALES):
            theirs = table[name][0]
            for key in (name, f"diffusion_model.{name}", theirs, f"transformer.{theirs}"):
                names[key] = name
    return names
