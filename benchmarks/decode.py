"""Autoencoder decode, ours against diffusers' `AutoencoderKL`, side by side in one process.

    python -m benchmarks.decode                                  # 512² and 1024², bf16 and fp32, 3 calls each
    python -m benchmarks.decode --sizes 256 --dtypes bfloat16 --runs 2   # a quick look

Both load the official autoencoder's architecture with the same random weights from the synthetic repository
(benchmarks/snapshot.py: `ae.safetensors` for ours through `flux.weights.loading.load_autoencoder`, `vae/` for
diffusers), in the same dtype, and decode the same latents (unscaled by each side's own scale and shift, as
the pipelines do: `AutoEncoder.decode` and `vae.decode(z / 0.3611 + 0.1159)`). Calls alternate between the sides
(who goes first alternates by round), after one warm-up call each. Reported: the median wall time and the median
process CPU time (the steadier of the two on a shared machine: it does not count the time the process waited
for a core, though it still counts the slower memory of a busy machine), and the largest difference between
the two sides' images, which says they computed the same thing.

Writes `decode.json` and `decode.md` into `--out`.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.snapshot import build
from benchmarks.machine import log, machine, machine_line

HERE = Path(__file__).resolve().parent


def measure(snapshot: Path, sizes: list[int], dtypes: list[str], runs: int, threads: int, warmup: bool = True) -> dict:
    from diffusers import AutoencoderKL

    from flux.weights.loading import load_autoencoder

    torch.set_num_threads(threads)
    results = {"machine": machine(threads), "runs": runs, "warmup": warmup, "cases": []}
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        ours = load_autoencoder(snapshot / "ae.safetensors", dtype=dtype)
        theirs = AutoencoderKL.from_pretrained(snapshot / "vae", torch_dtype=dtype).eval()
        scale, shift = theirs.config.scaling_factor, theirs.config.shift_factor
        sides = {"ours": lambda z: ours.decode(z),
                 "diffusers": lambda z: theirs.decode(z / scale + shift, return_dict=False)[0]}
        for size in sizes:
            z = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(dtype)
            case = {"dtype": dtype_name, "size": size, "load_average_before": os.getloadavg()[0],
                    "wall_s": {side: [] for side in sides}, "cpu_s": {side: [] for side in sides}}
            with torch.inference_mode():
                # The warm-up calls (untimed), or without them the first round's images, for the difference.
                images = {side: decode(z).float() for side, decode in sides.items()} if warmup else {}
                for round_ in range(runs):
                    for side in (sides if round_ % 2 == 0 else reversed(list(sides))):
                        start, start_cpu = time.perf_counter(), time.process_time()
                        images.setdefault(side, sides[side](z).float())
                        case["wall_s"][side].append(time.perf_counter() - start)
                        case["cpu_s"][side].append(time.process_time() - start_cpu)
                        log(f"{dtype_name} {size}² {side}: {case['wall_s'][side][-1]:.2f} s wall, "
                            f"{case['cpu_s'][side][-1]:.2f} s CPU")
            case["max_abs_difference"] = (images["ours"] - images["diffusers"]).abs().max().item()
            case["load_average_after"] = os.getloadavg()[0]
            results["cases"].append(case)
    return results


def markdown(results: dict) -> str:
    lines = [machine_line(results["machine"]), "",
             f"Medians of {results['runs']} calls per side, alternating, "
             f"{'after one warm-up each' if results.get('warmup', True) else 'no warm-up'}; seconds. "
             "\"×\" is diffusers' time over ours (above 1: we are faster).", "",
             "| dtype | size | ours wall | diffusers wall | × wall | ours CPU | diffusers CPU | × CPU | max abs difference | load average |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for case in results["cases"]:
        wall = {side: statistics.median(v) for side, v in case["wall_s"].items()}
        cpu = {side: statistics.median(v) for side, v in case["cpu_s"].items()}
        lines.append(f"| {case['dtype']} | {case['size']}² | {wall['ours']:.2f} | {wall['diffusers']:.2f} | "
                     f"{wall['diffusers'] / wall['ours']:.2f} | {cpu['ours']:.2f} | {cpu['diffusers']:.2f} | "
                     f"{cpu['diffusers'] / cpu['ours']:.2f} | {case['max_abs_difference']:.2g} | "
                     f"{case['load_average_before']:.1f} → {case['load_average_after']:.1f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", type=Path, default=Path("/tmp/flux-benchmark-snapshot"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "decode")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-warmup", action="store_true", help="time the first call too (for the slow 1024² cases)")
    args = parser.parse_args()
    results = measure(build(args.snapshot), args.sizes, args.dtypes, args.runs, args.threads, warmup=not args.no_warmup)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode.json").write_text(json.dumps(results, indent=1))
    (args.out / "decode.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
