"""What a training run is: `TrainConfig`, every field checked when it is made, read from a TOML file or the
command line (`config_from`, `read_config_file`)."""

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path

import tomllib
import torch

from flux.training.data import bucket_sizes
from flux.training.objective import TIMESTEP_SAMPLERS
from flux.weights.lora import DEFAULT_TARGETS

log = logging.getLogger("flux")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # fp16 would need loss scaling
LORA_FORMATS = ("diffusers", "kohya", "bfl")


@dataclass(frozen=True)
class TrainConfig:
    model: str  # a FLUX.1 snapshot folder or Hugging Face repo id
    data: str  # a folder of name.png + name.txt pairs
    output: str  # checkpoints, samples and the latent cache go here
    # What to train: every weight, or a LoRA of this rank (0: full fine-tuning).
    lora_rank: int = 0
    lora_alpha: float | None = None  # None: alpha = rank
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    lora_dropout: float = 0.0
    lora_format: str = "diffusers"  # of lora.safetensors: "diffusers", "kohya" or "bfl"
    # The data.
    resolution: int = 512  # buckets hold about resolution² pixels
    bucket_step: int = 64  # bucket sides are multiples of this (itself a multiple of 16)
    max_aspect: float = 2.0
    max_sequence_length: int | None = None  # T5 tokens; None: 256 for schnell-style models, 512 for dev
    # The optimisation.
    steps: int = 1000
    batch_size: int = 1  # per process; the global batch is batch_size × processes
    learning_rate: float = 1e-4
    warmup_steps: int = 0  # linear warm-up from learning_rate / warmup_steps
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    timestep_sampler: str = "shifted"  # "uniform", "logit_normal" or "shifted" (see sample_timesteps)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    guidance: float = 1.0  # the guidance input during training (dev-style models only)
    # Numerics and memory.
    dtype: str = "fp32"  # weights of every component loaded; LoRA tensors are fp32 regardless
    mixed_precision: str = "bf16"  # "bf16": forward and backward under torch.autocast; "no": in `dtype`
    gradient_checkpointing: bool = False
    # Checkpoints and samples.
    save_every: int = 500
    sample_every: int = 0  # 0: no samples
    sample_prompts: tuple[str, ...] = ()  # default: the first caption
    sample_steps: int | None = None  # default: the model's (4 for schnell, 50 for dev)
    resume: str | None = None  # a checkpoint folder, or "latest" (the newest in `output`, if any)
    seed: int = 0
    # Where.
    distributed: str = "fsdp"  # under torchrun with several processes: "fsdp" (FSDP2) or "ddp"
    device: str | None = None  # default: cuda (this process's local rank), mps or cpu
    progress: bool = True

    def __post_init__(self):
        choices = {"lora_format": LORA_FORMATS, "timestep_sampler": TIMESTEP_SAMPLERS, "dtype": tuple(DTYPES),
                   "mixed_precision": ("bf16", "no"), "distributed": ("fsdp", "ddp")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        positive = ("steps", "batch_size", "resolution", "save_every", "learning_rate")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("lora_rank", "warmup_steps", "sample_every", "weight_decay", "lora_dropout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)!r}")
        bucket_sizes(self.resolution, step=self.bucket_step, max_aspect=self.max_aspect)  # raises if they make no bucket


def config_from(values: dict) -> TrainConfig:
    """TrainConfig from a dict of settings (a config file's, overridden by flags), with clear errors."""
    known = {field.name for field in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; the settings are {sorted(known)}")
    missing = [name for name in ("model", "data", "output") if name not in values]
    if missing:
        raise ValueError(f"missing {', '.join('--' + name for name in missing)} (give them as flags or in --config)")
    for name in ("lora_targets", "sample_prompts"):  # lists in TOML and JSON
        if name in values:
            values[name] = tuple(values[name])
    if values.get("max_grad_norm") == 0:
        values["max_grad_norm"] = None
    return TrainConfig(**values)


def read_config_file(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"--config {path}: file not found")
    text = path.read_text(encoding="utf-8")
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--config {path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {error}") from None
    return {key.replace("-", "_"): value for key, value in values.items()}
