"""Our transformer step and autoencoder decode in other forms than the shipped ones, to see what each would give.

    python -m benchmarks.variants [--snapshot DIR] [--size 256] [--reps 3] [--variants ...]

Variants, each applied from outside to the modules `flux.weights.loading` builds (nothing here changes flux/):

  fp32             weights and arithmetic in fp32
  bf16             weights and arithmetic in bf16 (what `dtype=torch.bfloat16` gives today)
  bf16-storage     weights in bf16, every `nn.Linear` and `nn.Conv2d` computing in fp32 on upcast copies
                   made per call: bf16's memory with fp32's speed on CPUs without bf16 arithmetic
  fp32-channels-last   fp32, the autoencoder's weights and latents in channels-last memory order (decode only;
                   the transformer is as in fp32)
  fp32-compiled    fp32 under `torch.compile` (inductor, the whole transformer forward; decode not compiled)

Times are the median of `--reps` calls after one warm-up (which includes compilation); the CPU time of the
process is reported beside the wall time because on a shared machine it is the steadier of the two.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.snapshot import build
from flux.weights.loading import load_autoencoder, load_flow_model
from flux.pipelines.sampling import image_ids, text_ids

VARIANTS = ("fp32", "bf16", "bf16-storage", "fp32-channels-last", "fp32-compiled")


def compute_in_fp32(module: nn.Module) -> nn.Module:
    """Makes every Linear and Conv2d of `module` upcast its input and weights to fp32, and its output back."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            layer.forward = (lambda l: lambda x: F.linear(
                x.float(), l.weight.float(), None if l.bias is None else l.bias.float()).to(x.dtype))(layer)
        elif isinstance(layer, nn.Conv2d):
            layer.forward = (lambda l: lambda x: l._conv_forward(
                x.float(), l.weight.float(), None if l.bias is None else l.bias.float()).to(x.dtype))(layer)
    return module


def timed(function, reps: int) -> dict:
    start = time.perf_counter()
    function()
    first = time.perf_counter() - start
    wall, cpu = [], []
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        function()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "first_s": first}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", type=Path, default=Path("/tmp/flux-benchmark-snapshot"))
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--t5-layers", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "variants.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    snapshot = build(args.snapshot, double=args.double, single=args.single, t5_layers=args.t5_layers)
    size, text = args.size, 256
    generator = torch.Generator().manual_seed(0)
    inputs = dict(img=torch.randn(1, (size // 16) ** 2, 64, generator=generator), img_ids=image_ids(1, size, size),
                  txt=torch.randn(1, text, 4096, generator=generator), txt_ids=text_ids(1, text),
                  timesteps=torch.full((1,), 0.5), y=torch.randn(1, 768, generator=generator))
    latents = torch.randn(1, 16, size // 8, size // 8, generator=generator)
    rows = []
    print(f"step and decode at {size}², {args.threads} threads, median of {args.reps} after a warm-up\n")
    print("| variant | step wall (s) | step CPU (s) | decode wall (s) | decode CPU (s) | first step (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for variant in args.variants:
        dtype = torch.bfloat16 if variant.startswith("bf16") else torch.float32
        model, ae = load_flow_model(snapshot, dtype=dtype), load_autoencoder(snapshot, dtype=dtype)
        if variant == "bf16-storage":
            compute_in_fp32(model), compute_in_fp32(ae)
        if variant == "fp32-channels-last":
            ae = ae.to(memory_format=torch.channels_last)
        forward = torch.compile(model) if variant == "fp32-compiled" else model
        memory_format = torch.channels_last if variant == "fp32-channels-last" else torch.contiguous_format
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.inference_mode():
            step = timed(lambda: forward(**cast), args.reps)
            decode = timed(lambda: ae.decode(latents.to(dtype, memory_format=memory_format)), args.reps)
        rows.append({"variant": variant, "size": size, "step": step, "decode": decode})
        print(f"| {variant} | {step['wall_s']:.2f} | {step['cpu_s']:.2f} | {decode['wall_s']:.2f} | {decode['cpu_s']:.2f} | "
              f"{step['first_s']:.1f} |", flush=True)
        del model, ae, forward
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
