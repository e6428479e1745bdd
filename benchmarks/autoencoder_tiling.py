"""Peak memory and time of the autoencoder's decode: the whole image at once vs overlapping tiles.

    python benchmarks/autoencoder_tiling.py [--dtype bfloat16|float32] [--sizes 512 1024 2048]

The official-size autoencoder (83.8 M parameters) with random weights: speed and memory do not depend on
the values. Each case runs in a fresh process so that its peak resident memory (`ru_maxrss`) is its own;
"working memory" is that peak minus the process's peak just before decoding (Python, torch, the weights and
the latents). Prints a Markdown table.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from flux.modules.autoencoder import AutoEncoder, AutoEncoderParams, Tiling


def run_case(size: int, tile: bool, tiling: Tiling, dtype: torch.dtype) -> dict:
    """One decode of a size² image in this process: seconds, peak and baseline resident memory in GB."""
    torch.manual_seed(0)
    model = AutoEncoder(AutoEncoderParams(), tiling=tiling).to(dtype).eval()
    latents = torch.randn(1, 16, size // 8, size // 8, dtype=dtype)
    baseline = peak_gb()
    with torch.no_grad():
        start = time.perf_counter()
        image = model.decode(latents, tile=tile)
        seconds = time.perf_counter() - start
    assert image.shape == (1, 3, size, size)
    return {"seconds": seconds, "peak_gb": peak_gb(), "baseline_gb": baseline}


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def total_memory_gb() -> float:
    with open("/proc/meminfo") as meminfo:
        return int(meminfo.readline().split()[1]) / 2**20  # MemTotal, in KiB


def in_subprocess(size: int, tile: bool, tiling: Tiling, dtype: str) -> dict:
    case = json.dumps({"size": size, "tile": tile, "tiling": [tiling.size, tiling.overlap], "dtype": dtype})
    output = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True)
    if output.returncode == -9:  # the kernel's out-of-memory killer: the case does not fit in this machine
        return {"killed": True}
    if output.returncode:
        raise RuntimeError(f"case {case} failed:\n{output.stderr}")
    return json.loads(output.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    args = parser.parse_args()
    if args.case:
        case = json.loads(args.case)
        tiling = Tiling(size=case["tiling"][0], overlap=case["tiling"][1])
        print(json.dumps(run_case(case["size"], case["tile"], tiling, getattr(torch, case["dtype"]))))
        return

    default, small = Tiling(), Tiling(size=256, overlap=64)
    print(f"FLUX autoencoder decode, {args.dtype}, batch 1, {torch.get_num_threads()} CPU threads, torch {torch.__version__}\n")
    print("| image | mode | time (s) | peak RSS (GB) | working memory (GB) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for size in args.sizes:
        for tile, tiling in ((False, default), (True, default), (True, small)):
            if tile and tiling.size >= size:
                continue  # a single tile: the same computation as the whole image
            result = in_subprocess(size, tile, tiling, args.dtype)
            mode = f"tiled {tiling.size} px, overlap {tiling.overlap}" if tile else "whole image"
            if result.get("killed"):
                print(f"| {size}² | {mode} | – | killed: out of memory ({total_memory_gb():.0f} GB machine) | – |", flush=True)
                continue
            print(f"| {size}² | {mode} | {result['seconds']:.1f} | {result['peak_gb']:.2f} | "
                  f"{result['peak_gb'] - result['baseline_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
