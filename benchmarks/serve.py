"""`flux serve` under load: throughput (images/s) and p50/p95 latency at several concurrencies, with
`--max-batch` 1 and 4 side by side, on the built-in model.

    python -m benchmarks.serve [--requests 48] [--rounds 2] [--concurrency 1 4 16] [--max-batch 1 4] [--size 64x64] [--steps 8]

For each concurrency, and for each --max-batch value in turn, a fresh `flux serve` process (the command a user
runs, on a free port; started by tests/serving.py's helper) and that many client threads sending --requests
requests in all (one image each, distinct seeds and prompts, the OpenAI JSON shape) after two warm-up requests.
Latency is per request, from send to the last byte of the answer; throughput is images over the wall time of the
level. The two --max-batch settings run one after the other at each concurrency, never together, so a change in
the machine's load falls on both alike.
Prints the CPU, its bf16 flags and the load average beside the figures; writes JSON and Markdown to
benchmarks/results/serve.{json,md}.
"""

import argparse
import json
import os
import platform
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from tests.serving import serve_process

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    arguments.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    arguments.add_argument("--max-batch", type=int, nargs="+", default=[1, 4])
    arguments.add_argument("--size", default="64x64", help="the built-in model's default size")
    arguments.add_argument("--steps", type=int, default=8, help="the built-in model's default steps")
    arguments.add_argument("--dtype", default=None, help="passed to flux serve (default: its own choice)")
    arguments.add_argument("--rounds", type=int, default=2, help="runs of each setting, alternating their order")
    args = arguments.parse_args()
    about = machine()
    print(json.dumps(about, indent=1))
    rows = []
    extra = [] if args.dtype is None else ["--dtype", args.dtype]
    for concurrency in args.concurrency:
        runs = {max_batch: [] for max_batch in args.max_batch}
        for round_ in range(args.rounds):
            # A B, then B A: a drift in the machine's load falls on both settings alike.
            for max_batch in (args.max_batch if round_ % 2 == 0 else args.max_batch[::-1]):
                with serve_process("--max-batch", str(max_batch), "--max-queue", str(4 * max(args.concurrency)),
                                   *extra) as url:
                    runs[max_batch].append(level(url, concurrency=concurrency, requests=args.requests,
                                                 size=args.size, steps=args.steps))
        for max_batch, measured in runs.items():
            row = summary(measured)
            row.update(max_batch=max_batch, concurrency=concurrency)
            rows.append(row)
            print(f"max-batch {max_batch:2d}  concurrency {concurrency:2d}: {row['images_per_s']:.2f} images/s "
                  f"(rounds: {', '.join(f'{r:.2f}' for r in row['images_per_s_rounds'])}), "
                  f"p50 {row['p50_s']:.2f} s, p95 {row['p95_s']:.2f} s", flush=True)
    about["load_average_at_end"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps({"machine": about, "settings": vars(args), "rows": rows}, indent=1))
    (RESULTS / "serve.md").write_text(table(rows, about, args))
    print(table(rows, about, args))


def level(url: str, *, concurrency: int, requests: int, size: str, steps: int) -> dict:
    """`requests` requests from `concurrency` threads -> throughput and the sorted latencies."""
    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=concurrency + 2))

    def send(index: int) -> float:
        started = time.perf_counter()
        answer = client.post(url + "/v1/images/generations",
                             json={"prompt": f"benchmark picture {index}", "size": size, "steps": steps, "seed": index})
        answer.raise_for_status()  # a 429 here would mean --max-queue is too small for the level
        return time.perf_counter() - started

    for index in range(2):  # warm-up: first-call costs are not the server's steady state
        send(-1 - index)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = sorted(pool.map(send, range(requests)))
    wall = time.perf_counter() - started
    client.close()
    return {"requests": requests, "wall_s": wall, "images_per_s": requests / wall, "latencies_s": latencies}


def summary(runs: list) -> dict:
    """Rounds of one setting -> the median throughput, and percentiles over every round's latencies."""
    latencies = sorted(latency for run in runs for latency in run.pop("latencies_s"))
    return {"images_per_s": statistics.median(run["images_per_s"] for run in runs),
            "images_per_s_rounds": [run["images_per_s"] for run in runs], "requests": sum(run["requests"] for run in runs),
            "p50_s": statistics.median(latencies), "p95_s": percentile(latencies, 0.95)}


def percentile(ordered: list, fraction: float) -> float:
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    return {"cpu": model, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "avx512f": "avx512f" in flags, "torch": torch.__version__, "python": platform.python_version(),
            "load_average_at_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "threads_seen": threading.active_count()}


def table(rows: list, about: dict, args) -> str:
    lines = [f"`flux serve`, built-in model, {args.size}, {args.steps} steps, {args.requests} requests per level and "
             f"round, {args.rounds} rounds (throughput: their median; latency: over all their requests); "
             f"{about['cpu']}, {about['cores']} cores, avx512_bf16={about['avx512_bf16']}, amx_bf16={about['amx_bf16']}; "
             f"load average {about['load_average_at_start'][0]:.1f} at the start and "
             f"{about['load_average_at_end'][0]:.1f} at the end (a shared machine: other jobs ran throughout).", "",
             "| concurrency | max-batch | images/s | images/s per round | p50 latency (s) | p95 latency (s) |",
             "| ---: | ---: | ---: | --- | ---: | ---: |"]
    for row in rows:
        rounds = ", ".join(f"{value:.2f}" for value in row["images_per_s_rounds"])
        lines.append(f"| {row['concurrency']} | {row['max_batch']} | {row['images_per_s']:.2f} | {rounds} | "
                     f"{row['p50_s']:.2f} | {row['p95_s']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
