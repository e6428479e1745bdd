"""Fine-tuning FLUX: `train(TrainConfig(...))` from Python, `flux train` or `python -m flux.training.loop` from a shell.

One loop from a laptop to many machines. It loads a FLUX.1 snapshot, encodes the image folder once with the
autoencoder and the text encoders (`flux.training.build_cache`) and frees them, then runs AdamW on the
rectified-flow loss (`flux.training.rectified_flow_loss`): on every weight of the transformer (full
fine-tuning) or on a LoRA (`flux.weights.lora.add_lora`). Every `save_every` steps it writes a checkpoint folder:

    checkpoint-000500/
        model.safetensors           the transformer, official key names (full fine-tuning), or
        lora.safetensors            the LoRA, in diffusers', kohya's or Black Forest Labs' layout
        training_state.safetensors  AdamW's moments per parameter (and the LoRA's tensors, exactly)
        trainer.json                the step and the configuration

Every random draw of a step (the batch, the noise, the times, dropout) comes from generators seeded by
(seed, step), so a run resumed from a checkpoint at step k continues exactly as if it had not stopped.

Under `torchrun` it is data-parallel on PyTorch's own engines: FSDP2 (`fully_shard`, one unit per block, then
the root; parameters, gradients and AdamW's moments sharded over the ranks) or DDP. Each step's global batch
(batch_size × ranks) is drawn as in a single process and each rank trains on its slice, so N ranks compute
what one process with N times the batch computes.
"""

import argparse
import contextlib
import gc
import json
import logging
import os
import sys
import time
import tomllib
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from flux.modules.autoencoder import AutoEncoder
from flux.weights.checkpoint import CheckpointError, read_safetensors
from flux.modules.configs import SamplingDefaults
from flux.weights.loading import load_autoencoder, load_clip, load_flow_model, load_t5
from flux.weights.lora import DEFAULT_TARGETS, add_lora, save_lora
from flux.modules.transformer import Flux
from flux.pipelines.devices import default_device
from flux.pipelines.snapshots import resolve_snapshot, sampling_defaults
from flux.pipelines.sampling import denoise, get_noise, get_schedule, image_ids, pack, text_ids, unpack
from flux.training.objective import (
    TIMESTEP_SAMPLERS, LatentCache, bucket_sizes, build_cache, image_size, load_cache, nearest_bucket, read_folder,
    rectified_flow_loss, sample_timesteps, save_cache,
)

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


@dataclass
class TrainResult:
    model: Flux  # the trained transformer; under FSDP2 its parameters are this rank's shards
    losses: list[float]  # the global batch's loss at each step this call ran
    checkpoint: Path | None  # the last checkpoint written


def train(config: TrainConfig) -> TrainResult:
    """Fine-tunes the transformer of `config.model` on the images in `config.data`; see the module docstring."""
    with distributed() as (rank, world), warnings.catch_warnings():
        # FSDP2 warns that the model returns a view (F.linear's output reshaped); the loss only reads it.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPFlux\) returned a view tensor")
        device = training_device(config)
        root = resolve_snapshot(config.model)
        fsdp = world > 1 and config.distributed == "fsdp"
        # Under FSDP2 the weights load on the CPU: fully_shard moves each rank's shards to its device.
        core = load_flow_model(root, device="cpu" if fsdp else device, dtype=DTYPES[config.dtype])
        defaults = sampling_defaults(root, guidance_embed=core.params.guidance_embed)
        cache, ae = prepare_cache(config, root, defaults, rank=rank, device=device)
        make_trainable(core, config)
        model = distribute(core, strategy=config.distributed, world=world, device=device)
        trainable = [p for p in model.parameters() if p.requires_grad]  # after sharding: the shards
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        log.info("training %s parameters (%s) on %d process(es)", f"{sum(p.numel() for p in trainable):,}",
                 f"LoRA rank {config.lora_rank}" if config.lora_rank else "full fine-tuning", world)

        start, checkpoint = 0, None
        resume = latest_checkpoint(config.output) if config.resume == "latest" else config.resume
        if resume is not None:
            start = load_checkpoint(resume, model=model, core=core, optimizer=optimizer, config=config)
            log.info("resumed from %s at step %d", resume, start)

        order = DataOrder([tuple(z.shape[1:]) for z in cache.latents], config.batch_size * world, config.seed)
        mine = slice(rank * config.batch_size, (rank + 1) * config.batch_size)  # this rank's share of a batch
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.mixed_precision == "bf16")
        losses = []
        bar = tqdm(total=config.steps, initial=start, unit="step", desc="flux train", disable=rank != 0 or not config.progress)
        for step in range(start, config.steps):
            began = time.perf_counter()
            indices = order.batch(step)
            # The whole global batch's noise and times, from one generator: the same on every rank and
            # for every number of ranks.
            latents = torch.stack([cache.latents[i] for i in indices])  # (G, C, H, W)
            generator = torch.Generator().manual_seed(step_seed(config.seed, step))
            noise = torch.randn(latents.shape, generator=generator)
            t = sample_timesteps(len(indices), method=config.timestep_sampler, image_tokens=latents[0, 0].numel() // 4,
                                 mean=config.logit_mean, std=config.logit_std, base_shift=defaults.base_shift,
                                 max_shift=defaults.max_shift, generator=generator)
            txt, vec = cache.text(indices[mine])
            torch.manual_seed(step_seed(config.seed, step, 1 + rank))  # LoRA dropout's draws, per rank
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step)

            with autocast:
                loss = rectified_flow_loss(model, latents[mine].to(device), txt.to(device), vec.to(device),
                                           t[mine].to(device), noise=noise[mine].to(device), guidance=config.guidance)
            loss.backward()  # DDP and FSDP2 average the gradients over the ranks here
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            losses.append(mean_over_ranks(loss.detach(), world))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", images_per_s=f"{len(indices) / (time.perf_counter() - began):.2f}")
            bar.update()
            done = step + 1
            if done % config.save_every == 0 or done == config.steps:
                checkpoint = save_checkpoint(Path(config.output) / f"checkpoint-{done:06d}", model=model, core=core,
                                             optimizer=optimizer, config=config, step=done, rank=rank)
            if config.sample_every and done % config.sample_every == 0:
                write_samples(model if fsdp else core, ae, cache, config, defaults, step=done, device=device, autocast=autocast)
        bar.close()
        return TrainResult(core, losses, checkpoint)


# --------------------------------------------------------------------------------------------------
# Setting up: the data, the trainable parameters, the processes
# --------------------------------------------------------------------------------------------------

def prepare_cache(config: TrainConfig, root: Path, defaults: SamplingDefaults, *, rank: int,
                  device: torch.device) -> tuple[LatentCache, AutoEncoder | None]:
    """The dataset encoded once, and the autoencoder if samples are wanted (on rank 0; None elsewhere).

    Rank 0 encodes into `output/cache.safetensors`, reused by later runs (and resumed ones) while the
    images, captions, sample prompts and model are unchanged; the other ranks read that file, so only one
    process ever loads the text encoders. They are freed before training starts.
    """
    examples = read_folder(config.data)
    buckets = bucket_sizes(config.resolution, step=config.bucket_step, max_aspect=config.max_aspect)
    sizes = [nearest_bucket(*image_size(example.image), buckets) for example in examples]
    max_length = config.max_sequence_length or defaults.max_sequence_length
    prompts = list(config.sample_prompts or [examples[0].caption]) if config.sample_every else []
    fingerprint = json.dumps({
        "model": str(root.resolve()), "dtype": config.dtype, "max_sequence_length": max_length, "prompts": prompts,
        "examples": [[e.image.name, e.caption, *size, e.image.stat().st_size, e.image.stat().st_mtime_ns]
                     for e, size in zip(examples, sizes)],
    })
    path = Path(config.output) / "cache.safetensors"
    dtype, ae, cache = DTYPES[config.dtype], None, None
    if rank == 0:
        cache = load_cache(path, fingerprint=fingerprint)
        if cache is None:
            ae = load_autoencoder(root, device=device, dtype=dtype)
            t5 = load_t5(root, max_length=max_length, device=device, dtype=dtype)
            clip = load_clip(root, device=device, dtype=dtype)
            cache = build_cache(examples, sizes, ae=ae, t5=t5, clip=clip, extra_texts=tuple(prompts))
            save_cache(cache, path, fingerprint=fingerprint)
            del t5, clip
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if config.sample_every and ae is None:
            ae = load_autoencoder(root, device=device, dtype=dtype)
        ae = ae if config.sample_every else None
        log.info("%d images in %d bucket(s): %s", len(examples), len(set(sizes)),
                 ", ".join(f"{w}×{h}: {sizes.count((w, h))}" for w, h in sorted(set(sizes))))
    if dist.is_initialized():
        dist.barrier()
    if cache is None:
        cache = load_cache(path, fingerprint=fingerprint)
    return cache, ae


def make_trainable(model: Flux, config: TrainConfig) -> None:
    """Full fine-tuning trains every weight; LoRA freezes them all and adds its own (fp32) tensors."""
    model.requires_grad_(config.lora_rank == 0)
    if config.lora_rank:
        torch.manual_seed(config.seed)  # A's random start: the same on every rank, as FSDP2 needs
        add_lora(model, rank=config.lora_rank, alpha=config.lora_alpha, targets=config.lora_targets,
                 dropout=config.lora_dropout)
    model.gradient_checkpointing = config.gradient_checkpointing
    model.train()


@contextlib.contextmanager
def distributed():
    """Yields (rank, world size). Under torchrun (WORLD_SIZE > 1) the process group is started here from its
    environment variables, NCCL on CUDA and Gloo on the CPU, and ended on exit; a group the caller started
    is used and left alone."""
    if dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size()
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield 0, 1
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield dist.get_rank(), world
    finally:
        dist.destroy_process_group()


def training_device(config: TrainConfig) -> torch.device:
    device = torch.device(config.device) if config.device else default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # this process's GPU under torchrun
    return device


def distribute(model: Flux, *, strategy: str, world: int, device: torch.device) -> nn.Module:
    """The model as the training step calls it: itself (one process), sharded in place by FSDP2, or in DDP."""
    if world == 1:
        return model.to(device)
    if strategy == "ddp":
        wrapped = DistributedDataParallel(model.to(device), device_ids=[device] if device.type == "cuda" else None)
        wrapped.params = model.params  # rectified_flow_loss reads the model's configuration
        return wrapped
    mesh = init_device_mesh(device.type, (world,))
    # One FSDP unit per block: a block's weights are gathered just before it runs and freed after.
    for block in (*model.double_blocks, *model.single_blocks):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the rest: embedders and final layer
    return model


# --------------------------------------------------------------------------------------------------
# Each step: its data, its randomness, its learning rate
# --------------------------------------------------------------------------------------------------

class DataOrder:
    """Which examples step k trains on: a function of (seed, k) alone, so resuming needs only k.

    An epoch shuffles each bucket, cuts it into global batches (all of one size, so they stack), and
    shuffles the batches. A bucket that does not fill its last batch wraps around to its start: every
    batch is full, so it splits evenly over the ranks.
    """

    def __init__(self, sizes: list[tuple[int, int]], global_batch: int, seed: int):
        self.buckets = [[i for i, s in enumerate(sizes) if s == size] for size in sorted(set(sizes))]
        self.global_batch, self.seed = global_batch, seed
        self.steps_per_epoch = sum(-(-len(members) // global_batch) for members in self.buckets)
        self._epoch, self._batches = None, []

    def batch(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.epoch(epoch)
        return self._batches[index]

    def epoch(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        size, batches = self.global_batch, []
        for members in self.buckets:
            shuffled = [members[i] for i in rng.permutation(len(members))]
            padded = [shuffled[k % len(shuffled)] for k in range(-(-len(shuffled) // size) * size)]
            batches += [padded[k : k + size] for k in range(0, len(padded), size)]
        return [batches[k] for k in rng.permutation(len(batches))]


def step_seed(*numbers: int) -> int:
    """A 64-bit seed mixed from (seed, step, ...) by numpy's SeedSequence: nearby steps get unrelated streams."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(1, np.uint64)[0])


def learning_rate(config: TrainConfig, step: int) -> float:
    return config.learning_rate * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else config.learning_rate


def mean_over_ranks(value: Tensor, world: int) -> float:
    """A scalar averaged over the ranks (for the log: each rank's loss is its slice's)."""
    if world > 1:
        value = value.float().clone()
        dist.all_reduce(value)
        value /= world
    return value.item()


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


# --------------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def write_samples(model: nn.Module, ae: AutoEncoder | None, cache: LatentCache, config: TrainConfig,
                  defaults: SamplingDefaults, *, step: int, device: torch.device, autocast) -> None:
    """One image per sample prompt into `output/samples/`, always from the same seed, so that the images of
    successive steps compare. The sampler is the pipeline's (`flux.pipelines.sampling`), fed the prompts' cached
    embeddings: `flux.Pipeline` would need the text encoders, which training has freed. Under FSDP2 every
    rank runs the transformer; rank 0 (the one holding `ae`) decodes and writes."""
    prompts = list(config.sample_prompts or [cache.captions[0]])
    txt, vec = (x.to(device) for x in cache.prompts(prompts))
    size = config.resolution // 16 * 16
    batch = len(prompts)
    x = pack(get_noise(batch, size, size, seed=config.seed, device=device))
    timesteps = get_schedule(config.sample_steps or defaults.num_steps, x.shape[1], shift=defaults.shift_schedule,
                             base_shift=defaults.base_shift, max_shift=defaults.max_shift)
    model.eval()  # no LoRA dropout while sampling
    with autocast:
        x = denoise(model, x, image_ids(batch, size, size, device=device), txt.to(next(model.parameters()).dtype),
                    text_ids(batch, txt.shape[1], device=device), vec.to(next(model.parameters()).dtype), timesteps,
                    guidance=defaults.guidance)
    model.train()
    if ae is None:
        return
    pixels = ae.decode(unpack(x, size, size).to(next(ae.parameters()).dtype)).float()
    pixels = ((pixels + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3) in [0, 1]
    folder = Path(config.output) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    for index, (prompt, array) in enumerate(zip(prompts, pixels)):
        Image.fromarray((array * 255).round().astype(np.uint8)).save(folder / f"step-{step:06d}-{index}.png")
    log.info("wrote %d sample(s) for step %d to %s", len(prompts), step, folder)


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    # Flags not given stay out of the namespace (SUPPRESS), so they neither override the config file nor
    # TrainConfig's defaults.
    p = argparse.ArgumentParser(prog="flux train", argument_default=argparse.SUPPRESS,
                                description="Fine-tune FLUX.1 (full or LoRA) on a folder of name.png + name.txt pairs. "
                                            "Run under torchrun for several GPUs or machines.")
    p.add_argument("--config", type=Path, help="a TOML or JSON file of settings named as TrainConfig's fields; flags override it")
    p.add_argument("--model", help="FLUX.1 snapshot folder or Hugging Face repo id")
    p.add_argument("--data", help="folder of images with captions (name.png + name.txt)")
    p.add_argument("--output", help="folder for checkpoints, samples and the latent cache")
    p.add_argument("--lora-rank", type=int, help="train a LoRA of this rank (default 0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    p.add_argument("--lora-targets", nargs="+", help="glob patterns of the Linears to adapt (default: attention and MLPs)")
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--lora-format", choices=LORA_FORMATS, help="layout of lora.safetensors (default diffusers)")
    p.add_argument("--resolution", type=int, help="train at about this many pixels squared (default 512)")
    p.add_argument("--bucket-step", type=int, help="bucket sides are multiples of this, itself a multiple of 16 (default 64)")
    p.add_argument("--max-aspect", type=float, help="largest bucket aspect ratio (default 2)")
    p.add_argument("--max-sequence-length", type=int, help="T5 tokens (default: 256 schnell, 512 dev)")
    p.add_argument("--steps", type=int, help="optimiser steps in all (default 1000)")
    p.add_argument("--batch-size", type=int, help="images per step per process (default 1)")
    p.add_argument("--learning-rate", "--lr", type=float, help="AdamW's learning rate (default 1e-4)")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--weight-decay", type=float, help="AdamW's weight decay (default 0.01)")
    p.add_argument("--max-grad-norm", type=float, help="clip the gradient norm to this (default 1; 0: off)")
    p.add_argument("--timestep-sampler", choices=TIMESTEP_SAMPLERS, help="default: shifted")
    p.add_argument("--logit-mean", type=float)
    p.add_argument("--logit-std", type=float)
    p.add_argument("--guidance", type=float, help="guidance input while training dev-style models (default 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weights of the loaded components (default fp32)")
    p.add_argument("--mixed-precision", choices=("bf16", "no"), help="bf16 autocast (default) or none")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each block in the backward pass")
    p.add_argument("--save-every", type=int, help="write a checkpoint every N steps (default 500) and at the end")
    p.add_argument("--sample-every", type=int, help="write sample images every N steps (default 0: never)")
    p.add_argument("--sample-prompt", dest="sample_prompts", action="append", help="a prompt for the samples (repeatable)")
    p.add_argument("--sample-steps", type=int)
    p.add_argument("--resume", help="a checkpoint folder, or 'latest' for the newest one in --output")
    p.add_argument("--seed", type=int)
    p.add_argument("--distributed", choices=("fsdp", "ddp"), help="under torchrun: FSDP2 (default) or DDP")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--quiet", dest="progress", action="store_false", help="no progress bar, no messages")
    return p


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


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 bad settings or files, 1 anything else."""
    args = vars(parser().parse_args(argv))  # exits with 2 on malformed flags
    quiet = not args.get("progress", True) or int(os.environ.get("RANK", "0")) > 0
    logging.basicConfig(level=logging.ERROR if quiet else logging.INFO, format="flux: %(message)s")
    try:
        values = read_config_file(args.pop("config")) if "config" in args else {}
        config = config_from(values | args)
        train(config)
    except (ValueError, CheckpointError) as error:
        print(f"flux train: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - the one place that turns failures into an exit code
        print(f"flux train: failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
