"""`flux train` (and `python -m flux.training`): the command line over `flux.training.train`."""

import argparse
import logging
import os
import sys
from pathlib import Path

from flux.training.config import DTYPES, LORA_FORMATS, config_from, read_config_file
from flux.training.loop import train
from flux.training.objective import TIMESTEP_SAMPLERS
from flux.weights.checkpoint import CheckpointError

log = logging.getLogger("flux")


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
