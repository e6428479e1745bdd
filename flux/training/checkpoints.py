"""Training checkpoints: the transformer (or its LoRA) in a loadable file, AdamW's state and the step, written and
read back so a resumed run continues bit for bit; under FSDP2 the shards are gathered into whole tensors."""

import contextlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from flux.modules.transformer import Flux
from flux.training.config import TrainConfig
from flux.weights.checkpoint import CheckpointError, read_safetensors
from flux.weights.lora import save_lora

log = logging.getLogger("flux")


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------

def save_checkpoint(folder: Path, *, model: nn.Module, core: Flux, optimizer: torch.optim.Optimizer,
                    config: TrainConfig, step: int, rank: int) -> Path:
    """Writes a checkpoint folder (see the module docstring). Every rank calls it: under FSDP2 the tensors
    are gathered from all of them; rank 0 writes, into `folder.tmp` renamed at the end, so a run killed
    while writing never leaves a half checkpoint behind."""
    # Whole tensors on rank 0's CPU, one at a time; {} on the other ranks. Frozen weights are left out.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(model, options=options)
    moments = get_optimizer_state_dict(model, optimizer, options=options).get("state", {})
    partial = folder.with_name(folder.name + ".tmp")
    if rank == 0:
        partial.mkdir(parents=True, exist_ok=True)
    state = {f"optimizer.{name}.{key}": value.contiguous() for name, entry in moments.items() for key, value in entry.items()}
    if config.lora_rank:
        with whole_parameters(core):  # collective under FSDP2
            if rank == 0:
                save_lora(core, partial / "lora.safetensors", format=config.lora_format)
        # The exchange layouts may split or rescale the tensors; resuming reads them exactly from here.
        state |= {f"lora.{name}": tensor.contiguous() for name, tensor in weights.items()}
    if rank == 0:
        if not config.lora_rank:
            save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(partial / "model.safetensors"),
                      metadata={"format": "pt"})
        save_file(state, str(partial / "training_state.safetensors"))
        (partial / "trainer.json").write_text(json.dumps({"step": step, "config": asdict(config)}, indent=2) + "\n")
        if folder.exists():
            for old in folder.iterdir():
                old.unlink()
            folder.rmdir()
        partial.rename(folder)
        log.info("wrote %s", folder)
    if dist.is_initialized():
        dist.barrier()
    return folder


def load_checkpoint(folder, *, model: nn.Module, core: Flux, optimizer: torch.optim.Optimizer, config: TrainConfig) -> int:
    """Restores the trained tensors and AdamW's moments from a checkpoint folder; returns its step.

    The optimiser's hyperparameters come from `config`, not the checkpoint: a resumed run may change them.
    """
    folder = Path(folder)
    if not (folder / "trainer.json").is_file():
        raise CheckpointError(f"{folder}: not a checkpoint folder (no trainer.json)")
    saved = json.loads((folder / "trainer.json").read_text(encoding="utf-8"))
    for name in ("lora_rank", "lora_alpha", "lora_targets"):
        ours, theirs = asdict(config)[name], saved["config"][name]
        if (list(ours) if isinstance(ours, tuple) else ours) != theirs:
            raise ValueError(f"{folder} was trained with {name}={theirs!r}, this run has {ours!r}; they must match to resume")
    tensors = read_safetensors(folder / "training_state.safetensors")
    if config.lora_rank:
        weights = {name.removeprefix("lora."): tensor for name, tensor in tensors.items() if name.startswith("lora.")}
    else:
        weights = read_safetensors(folder / "model.safetensors")
    names = [name for name, p in core.named_parameters() if p.requires_grad]
    missing = [name for name in names if name not in weights]
    if missing:
        raise CheckpointError(f"{folder}: no saved value for {len(missing)} trained tensor(s), e.g. {missing[:3]}")
    options = StateDictOptions(full_state_dict=True, strict=False)  # LoRA: the frozen weights are not in the file
    set_model_state_dict(model, {name: weights[name] for name in names}, options=options)
    moments = {}
    for key, tensor in tensors.items():
        if key.startswith("optimizer."):
            name, field = key.removeprefix("optimizer.").rsplit(".", 1)
            moments.setdefault(name, {})[field] = tensor
    hyperparameters = {key: value for key, value in optimizer.param_groups[0].items() if key != "params"}
    set_optimizer_state_dict(model, optimizer, {"state": moments, "param_groups": [{**hyperparameters, "params": names}]},
                             options=StateDictOptions(full_state_dict=True))
    return int(saved["step"])


def latest_checkpoint(output) -> Path | None:
    """The newest complete checkpoint folder in `output`, or None."""
    folders = sorted(p for p in Path(output).glob("checkpoint-*") if p.is_dir() and not p.name.endswith(".tmp"))
    return folders[-1] if folders else None


@contextlib.contextmanager
def whole_parameters(model: nn.Module):
    """Under FSDP2 the trained tensors are shards (DTensors), and save_lora reads whole ones: gather each
    trained tensor (a LoRA's are small) into its module for the duration, and put the shard back after.
    Every rank must enter; outside FSDP2 this does nothing."""
    swapped = []
    for owner in model.modules():
        for name, parameter in list(owner.named_parameters(recurse=False)):
            if parameter.requires_grad and isinstance(parameter, DTensor):
                swapped.append((owner, name, parameter))
                setattr(owner, name, nn.Parameter(parameter.full_tensor(), requires_grad=False))
    try:
        yield
    finally:
        for owner, name, parameter in swapped:
            setattr(owner, name, parameter)
