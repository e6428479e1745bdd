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

import contextlib
import gc
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from flux.modules.autoencoder import AutoEncoder
from flux.modules.configs import SamplingDefaults
from flux.modules.transformer import Flux
from flux.pipelines.devices import default_device
from flux.pipelines.sampling import (
    denoise,
    get_noise,
    get_schedule,
    image_ids,
    pack,
    text_ids,
    unpack,
)
from flux.pipelines.snapshots import resolve_snapshot, sampling_defaults
from flux.training.checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from flux.training.config import DTYPES, TrainConfig
from flux.training.data import (
    DataOrder,
    LatentCache,
    bucket_sizes,
    build_cache,
    image_size,
    load_cache,
    nearest_bucket,
    read_folder,
    save_cache,
    step_seed,
)
from flux.training.objective import rectified_flow_loss, sample_timesteps
from flux.weights.loading import load_autoencoder, load_clip, load_flow_model, load_t5
from flux.weights.lora import add_lora

log = logging.getLogger("flux")


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

