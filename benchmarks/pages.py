"""What `release_pages=True` costs and saves: our pipeline with and without it, side by side in one run.

    python -m benchmarks.pages [--size 512 --processes 4 --threads 1]

Each side runs in processes of its own (peak resident memory is per process), alternating on/off: the
synthetic repository of benchmarks/snapshot.py (real width, reduced depth) in bf16, loaded as `flux generate`
loads it (text encoders released), one generation with decode (its peak RSS, `ru_maxrss`) and then two calls
of one step each (their transformer step times, timed by hooks: the page faults that map the released pages
again fall inside them). Writes `pages.json` and `pages.md` into `--out`.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.machine import log, machine, machine_line
from benchmarks.snapshot import PROMPT, build

HERE = Path(__file__).resolve().parent


def worker(snapshot: Path, size: int, release: bool, threads: int) -> dict:
    from flux.pipelines.pipeline import Pipeline

    torch.set_num_threads(threads)
    pipe = Pipeline.from_pretrained(snapshot, device="cpu", dtype=torch.bfloat16, release_text_encoders=True,
                                    release_pages=release)
    steps, start = [], []
    pipe.model.register_forward_pre_hook(lambda *_: start.append(time.perf_counter()))
    pipe.model.register_forward_hook(lambda *_: steps.append(time.perf_counter() - start[-1]))
    pipe(PROMPT, width=size, height=size, num_steps=1, seed=0, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    steps.clear()
    for _ in range(2):
        pipe(PROMPT, width=size, height=size, num_steps=1, seed=0, progress=False, output_type="latent")
    return {"release_pages": release, "peak_rss_gb": peak, "step_s": list(steps)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", type=Path, default=Path("/tmp/flux-benchmark-snapshot"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "pages")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--processes", type=int, default=4, help="in all, alternating on and off")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--worker", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("@@" + json.dumps(worker(args.snapshot, args.size, args.worker == "on", args.threads)), flush=True)
        return
    snapshot = build(args.snapshot)
    result = {"machine": machine(args.threads), "size": args.size, "runs": []}
    for index in range(args.processes):
        side = "on" if index % 2 == 0 else "off"
        output = subprocess.run([sys.executable, "-m", "benchmarks.pages", "--worker", side, "--snapshot", str(snapshot),
                                 "--size", str(args.size), "--threads", str(args.threads)],
                                capture_output=True, text=True, check=True).stdout
        run = json.loads(next(line for line in output.splitlines() if line.startswith("@@"))[2:])
        result["runs"].append(run)
        log(f"release_pages {side}: peak RSS {run['peak_rss_gb']:.2f} GiB, steps {', '.join(f'{s:.2f}' for s in run['step_s'])} s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pages.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (args.out / "pages.md").write_text(text)
    print(text)


def markdown(r: dict) -> str:
    sides = {flag: [run for run in r["runs"] if run["release_pages"] is flag] for flag in (True, False)}
    step = {flag: statistics.median(s for run in runs for s in run["step_s"]) for flag, runs in sides.items()}
    peak = {flag: max(run["peak_rss_gb"] for run in runs) for flag, runs in sides.items()}
    return "\n".join([
        machine_line(r["machine"]), "",
        f"Synthetic repository (real width, 2 double + 4 single blocks, 2 T5 layers), bf16, {r['size']}², one step; "
        f"{len(r['runs'])} processes alternating; step: median of every process's two timed steps; peak RSS: the "
        "largest of the side's processes over load, a generation with decode and the two steps.", "",
        "| release_pages | transformer step (s) | peak RSS (GiB) |", "| --- | ---: | ---: |",
        f"| False | {step[False]:.2f} | {peak[False]:.2f} |",
        f"| True | {step[True]:.2f} | {peak[True]:.2f} |",
        f"| True / False | {step[True] / step[False]:.3f}× | {peak[True] / peak[False]:.2f}× |", ""])


if __name__ == "__main__":
    main()
