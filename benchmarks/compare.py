"""Our pipeline and diffusers' `FluxPipeline` side by side: speed, memory and the fraction of the machine's limit.

    python -m benchmarks.compare                      # the full run (see benchmarks/README.md)
    python -m benchmarks.compare --sizes 256 --dtypes float32 --runs 1   # a quick look

A synthetic FLUX.1-schnell repository at the real widths and reduced depth (benchmarks/snapshot.py) is
loaded by both pipelines, each in its own process (so that their peak resident memory stays apart),
with the same threads, dtype, resolution, prompt, seed and steps. For every (dtype, resolution) the run:

  1. measures this machine's limit in a third process: every distinct matrix product one transformer step
     makes (`F.linear` at the step's own shapes) and its attention (`F.scaled_dot_product_attention` at the
     step's shape), each after a warm-up, the fastest of `--roofline-reps`; the roofline of a step is the sum
     of those times, each multiplied by how often the step makes it;
  2. starts both pipelines one after the other (timing the load: from the files on disk to a ready
     pipeline), then calls them alternately, `--runs` times each (ours first on even rounds, diffusers
     first on odd ones), timing the text encoding, every transformer call, the decode and the whole call
     from inside the process;
  3. reports medians over the runs (the per-step time is the median over every step of every run) and each
     process's peak resident memory (`ru_maxrss`) over its load and its calls.

The default plan fits about 40 minutes on a quiet 2-core machine: fp32 calls make 2 steps at 256² and 512² and
decode; bf16 calls (slow on CPUs without bf16 arithmetic) make 1 step and decode at 256² only; at 1024² every
call makes 1 step and stops at the latents. `--steps` and `--decode` change that.

Writes `results.json` (every sample), `results.md` (the table) and `step_time.png` into `--out`.
"""

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.snapshot import PROMPT, build

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TEXT_TOKENS = 256  # FLUX.1-schnell's T5 length, what both pipelines use here


# --------------------------------------------------------------------------------------------------
# The workers: one pipeline in one process, driven by JSON lines on stdin
# --------------------------------------------------------------------------------------------------

def worker(side: str, snapshot: Path, dtype: torch.dtype, threads: int, quantize: str | None = None) -> None:
    """Loads one side's pipeline, reports the load, then runs each requested call and reports its timings."""
    torch.set_num_threads(threads)
    timings: dict[str, list[float]] = {}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            timings.setdefault(name, []).append(time.perf_counter() - start)
            return result
        return wrapper

    start = time.perf_counter()
    if side == "ours":
        from flux.pipelines.pipeline import Pipeline

        # As `flux generate` loads: the text encoders released before denoising (a later call reads them again
        # from the page cache, inside the timed text encoding), and the transformer's mapped pages given back
        # after each block (flux/weights/pages.py; the faults that map them again are inside the timed steps).
        pipe = Pipeline.from_pretrained(snapshot, device="cpu", dtype=dtype, release_text_encoders=True,
                                        release_pages=True, quantize=quantize)
        transformer = pipe.model
        pipe._encode = timed("text", pipe._encode)  # tokenizers, T5 and CLIP: what diffusers' encode_prompt does
        pipe.ae.decode = timed("decode", pipe.ae.decode)

        def call(size, steps, decode):
            return pipe(PROMPT, width=size, height=size, num_steps=steps, seed=0, progress=False,
                        output_type="pil" if decode else "latent")
    else:
        import diffusers
        import transformers
        from diffusers import FluxPipeline

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        pipe = FluxPipeline.from_pretrained(snapshot, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        transformer = pipe.transformer
        pipe.encode_prompt = timed("text", pipe.encode_prompt)
        pipe.vae.decode = timed("decode", pipe.vae.decode)

        def call(size, steps, decode):
            return pipe(PROMPT, width=size, height=size, num_inference_steps=steps, guidance_scale=0.0,
                        max_sequence_length=TEXT_TOKENS, generator=torch.Generator("cpu").manual_seed(0),
                        output_type="pil" if decode else "latent")
    load_seconds = time.perf_counter() - start
    step_start = []
    transformer.register_forward_pre_hook(lambda *_: step_start.append(time.perf_counter()))
    transformer.register_forward_hook(lambda *_: timings.setdefault("step", []).append(time.perf_counter() - step_start[-1]))
    report({"load_s": load_seconds, "rss_after_load_gb": rss_gb(), "peak_rss_gb": peak_rss_gb()})

    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        timings.clear()
        start = time.perf_counter()
        call(request["size"], request["steps"], request["decode"])
        total = time.perf_counter() - start
        report({"total_s": total, "text_s": sum(timings.get("text", [])), "step_s": timings.get("step", []),
                "decode_s": sum(timings["decode"]) if "decode" in timings else None, "peak_rss_gb": peak_rss_gb()})
    report({"peak_rss_gb": peak_rss_gb()})


def report(record: dict) -> None:
    print("@@" + json.dumps(record), flush=True)  # marked, so that library output on stdout cannot interfere


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def rss_gb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


class Worker:
    """A worker process seen from the driver."""

    def __init__(self, side: str, snapshot: Path, dtype: str, threads: int, quantize: str | None = None):
        self.side = side
        command = [sys.executable, "-m", "benchmarks.compare", "--worker", side, "--snapshot", str(snapshot),
                   "--dtypes", dtype, "--threads", str(threads)] + (["--quantize", quantize] if quantize else [])
        environment = dict(os.environ, DIFFUSERS_VERBOSITY="error", TRANSFORMERS_VERBOSITY="error")
        self.process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env=environment)
        self.loaded = self._read()

    def run(self, size: int, steps: int, decode: bool) -> dict:
        self.process.stdin.write(json.dumps({"size": size, "steps": steps, "decode": decode}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> dict:
        self.process.stdin.write(json.dumps({"quit": True}) + "\n")
        self.process.stdin.flush()
        final = self._read()
        self.process.wait()
        return final

    def _read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"the {self.side} worker stopped (exit code {self.process.wait()}); see its stderr above")


# --------------------------------------------------------------------------------------------------
# The roofline: this machine's speed on exactly the products one transformer step makes
# --------------------------------------------------------------------------------------------------

def step_operations(config: dict, size: int) -> tuple[dict, dict]:
    """The matrix products of one transformer step at size² pixels, batch 1: {(m, k, n): count} for
    `F.linear` (m rows, k inputs, n outputs) and {L: count} for joint attentions over L tokens."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    mlp, context, pooled = 4 * hidden, config["joint_attention_dim"], config["pooled_projection_dim"]
    image, text = (size // 16) ** 2, TEXT_TOKENS
    linears: dict[tuple[int, int, int], int] = {}

    def add(m, k, n, count=1):
        linears[(m, k, n)] = linears.get((m, k, n), 0) + count

    add(image, config["in_channels"], hidden)  # img_in
    add(text, context, hidden)  # txt_in
    add(1, 256, hidden), add(1, hidden, hidden)  # time_in
    add(1, pooled, hidden), add(1, hidden, hidden)  # vector_in
    for tokens in (image, text):  # each stream of each double block
        add(1, hidden, 6 * hidden, config["num_layers"])  # modulation
        add(tokens, hidden, 3 * hidden, config["num_layers"])  # q, k, v
        add(tokens, hidden, hidden, config["num_layers"])  # attention output projection
        add(tokens, hidden, mlp, config["num_layers"])
        add(tokens, mlp, hidden, config["num_layers"])
    joint = image + text
    add(1, hidden, 3 * hidden, config["num_single_layers"])  # modulation
    add(joint, hidden, 3 * hidden + mlp, config["num_single_layers"])  # q, k, v and the MLP's input
    add(joint, hidden + mlp, hidden, config["num_single_layers"])
    add(1, hidden, 2 * hidden), add(image, hidden, config["in_channels"])  # final layer
    return linears, {joint: config["num_layers"] + config["num_single_layers"]}


def roofline(config: dict, size: int, dtype: torch.dtype, threads: int, reps: int) -> dict:
    """Times every operation of `step_operations` alone (after a warm-up, the fastest of `reps`)."""
    torch.set_num_threads(threads)
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    linears, attentions = step_operations(config, size)

    def fastest(function) -> float:
        function()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return min(times)

    result = {"linear_flops": 0, "linear_s": 0.0, "attention_flops": 0, "attention_s": 0.0, "shapes": []}
    with torch.inference_mode():
        for (m, k, n), count in sorted(linears.items()):
            x, weight, bias = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype) / k**0.5, torch.randn(n, dtype=dtype)
            seconds = fastest(lambda: F.linear(x, weight, bias))
            result["linear_flops"] += 2 * m * k * n * count
            result["linear_s"] += seconds * count
            result["shapes"].append({"linear": [m, k, n], "count": count, "s": seconds})
        for length, count in attentions.items():
            q, k, v = (torch.randn(1, heads, length, head_dim, dtype=dtype) for _ in range(3))
            seconds = fastest(lambda: F.scaled_dot_product_attention(q, k, v))
            result["attention_flops"] += 4 * heads * length * length * head_dim * count  # QKᵀ and PV
            result["attention_s"] += seconds * count
            result["shapes"].append({"attention": [1, heads, length, head_dim], "count": count, "s": seconds})
    result["roofline_s"] = result["linear_s"] + result["attention_s"]
    result["gemm_gflops"] = result["linear_flops"] / result["linear_s"] / 1e9
    result["sdpa_gflops"] = result["attention_flops"] / result["attention_s"] / 1e9
    return result


def roofline_in_subprocess(snapshot: Path, size: int, dtype: str, threads: int, reps: int) -> dict:
    command = [sys.executable, "-m", "benchmarks.compare", "--roofline-case", str(size), "--snapshot", str(snapshot),
               "--dtypes", dtype, "--threads", str(threads), "--roofline-reps", str(reps)]
    output = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(next(line[2:] for line in output.stdout.splitlines() if line.startswith("@@")))


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------

def measure(args) -> dict:
    snapshot = build(args.snapshot, double=args.double, single=args.single, t5_layers=args.t5_layers)
    config = json.loads((snapshot / "transformer" / "config.json").read_text())
    steps, decode_sizes = args.steps, args.decode
    results = {"machine": machine(args.threads), "command": " ".join(sys.argv), "prompt": PROMPT,
               "config": {"transformer": {k: config[k] for k in ("num_layers", "num_single_layers", "num_attention_heads",
                                                                  "attention_head_dim", "joint_attention_dim")},
                          "t5_layers": args.t5_layers, "text_tokens": TEXT_TOKENS, "runs": args.runs,
                          "steps": steps, "decode_sizes": decode_sizes}, "cases": []}
    started = time.perf_counter()
    for dtype in args.dtypes:
        for index, size in enumerate(args.sizes):
            case = {"dtype": dtype, "size": size, "steps": steps[dtype][size], "decode": size in decode_sizes[dtype],
                    "load_average_before": os.getloadavg()[0], "quiet_flag": Path("/tmp/flux-quiet").exists()}
            try:
                measure_case(case, snapshot, args, first="ours" if index % 2 == 0 else "diffusers")
            except (RuntimeError, subprocess.CalledProcessError) as error:  # e.g. a worker killed for memory
                case["error"] = str(error)
                log(f"{dtype} {size}²: failed: {error}")
            case["load_average_after"] = os.getloadavg()[0]
            results["cases"].append(case)
            if "error" not in case:
                log(f"{dtype} {size}²: step ours {case['ours']['summary']['step_s']:.2f} s, diffusers "
                    f"{case['diffusers']['summary']['step_s']:.2f} s, roofline {case['roofline']['roofline_s']:.2f} s "
                    f"({time.perf_counter() - started:.0f} s so far)")
            write(results, args.out)
    # Load times: one per (side, dtype, resolution) process; their median over resolutions per dtype.
    results["load"] = {dtype: {side: statistics.median(loads) if (loads := [
        c[side]["load"]["load_s"] for c in ok_cases(results) if c["dtype"] == dtype]) else None
        for side in ("ours", "diffusers")} for dtype in args.dtypes}
    results["seconds"] = time.perf_counter() - started
    return results


def measure_case(case: dict, snapshot: Path, args, *, first: str) -> None:
    """The roofline, then both pipelines loaded one after the other and called alternately, into `case`."""
    dtype, size = case["dtype"], case["size"]
    log(f"{dtype} {size}²: roofline")
    case["roofline"] = roofline_in_subprocess(snapshot, size, dtype, args.threads, args.roofline_reps)
    case["step_flops"] = flops = case["roofline"]["linear_flops"] + case["roofline"]["attention_flops"]
    sides = (first, "diffusers" if first == "ours" else "ours")  # who loads and runs first alternates by case
    workers = {}
    try:
        for side in sides:
            log(f"{dtype} {size}²: loading {side}")
            workers[side] = Worker(side, snapshot, dtype, args.threads, args.quantize if side == "ours" else None)
        runs = {side: [] for side in sides}
        for round_ in range(args.runs):
            for side in (sides if round_ % 2 == 0 else sides[::-1]):
                log(f"{dtype} {size}²: run {round_ + 1}/{args.runs} {side}")
                runs[side].append(workers[side].run(size, case["steps"], case["decode"]))
        for side in sides:
            final = workers[side].close()
            case[side] = {"load": workers[side].loaded, "runs": runs[side], "peak_rss_gb": final["peak_rss_gb"]}
            case[side]["summary"] = summarise(case[side], case["roofline"], flops)
    finally:
        for worker_ in workers.values():
            if worker_.process.poll() is None:
                worker_.process.kill()


def ok_cases(results: dict) -> list[dict]:
    return [case for case in results["cases"] if "error" not in case]


def summarise(side: dict, roofline_: dict, flops: int) -> dict:
    runs = side["runs"]
    step = statistics.median(s for run in runs for s in run["step_s"])
    summary = {"step_s": step, "text_s": statistics.median(r["text_s"] for r in runs),
               "total_s": statistics.median(r["total_s"] for r in runs),
               "decode_s": statistics.median(r["decode_s"] for r in runs) if runs[0]["decode_s"] is not None else None,
               "first_call_s": runs[0]["total_s"], "load_s": side["load"]["load_s"], "peak_rss_gb": side["peak_rss_gb"],
               "roofline_fraction": roofline_["roofline_s"] / step,
               "gemm_fraction": flops / step / 1e9 / roofline_["gemm_gflops"], "gflops": flops / step / 1e9}
    return summary


def machine(threads: int) -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    import diffusers
    import transformers
    return {"cpu": model, "cores": os.cpu_count(), "threads": threads,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags, "avx512_vnni": "avx512_vnni" in flags,
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "load_average_at_start": os.getloadavg(),
            "quiet_flag": Path("/tmp/flux-quiet").exists(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            # Which code was measured: the files change under a working tree that is not yet committed.
            "sha256": {name: hashlib.sha256((ROOT / "flux" / name).read_bytes()).hexdigest()[:16]
                       for name in ("modules/transformer.py", "modules/autoencoder.py", "pipelines/sampling.py",
                                    "pipelines/pipeline.py", "weights/loading.py", "weights/checkpoint.py",
                                    "weights/int8.py")}}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Output: JSON, Markdown and a plot
# --------------------------------------------------------------------------------------------------

def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    try:
        import matplotlib  # noqa: F401 - the plot's one extra requirement
    except ImportError:
        print(f"no plot: matplotlib is not installed (pip install matplotlib); the figures are in {out / 'results.md'}")
        return
    plot(results, out / "step_time.png")


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, avx512_bf16: {m['avx512_bf16']}, "
             f"avx512_vnni: {m.get('avx512_vnni')}; "
             f"torch {m['torch']}, diffusers {m['diffusers']}; quiet flag: {m['quiet_flag']}; load average at start "
             f"{m['load_average_at_start'][0]:.1f}; {m['date']}.", "",
             f"Medians of {results['config']['runs']} runs per side; times in seconds, memory in GiB; "
             "\"×\" is diffusers' figure over ours (above 1: we are faster or smaller).", "",
             "| dtype | size | steps | metric | ours | diffusers | × |", "| --- | --- | ---: | --- | ---: | ---: | ---: |"]
    names = [("step_s", "transformer step"), ("text_s", "text encoding"), ("decode_s", "decode"),
             ("total_s", "end to end"), ("first_call_s", "first call"), ("load_s", "load"), ("peak_rss_gb", "peak RSS")]
    for case in ok_cases(results):
        ours, theirs = case["ours"]["summary"], case["diffusers"]["summary"]
        for key, name in names:
            if ours[key] is None:
                continue
            label = name + (" (to latents)" if key == "total_s" and not case["decode"] else "")
            lines.append(f"| {case['dtype']} | {case['size']}² | {case['steps']} | {label} | {ours[key]:.3g} | "
                         f"{theirs[key]:.3g} | {theirs[key] / ours[key]:.2f} |")
    lines += ["", "Roofline: the step's linear products at this machine's measured speed for each of their shapes "
              "plus its attentions at the measured SDPA speed (measured in the same run).", "",
              "| dtype | size | GEMM GFLOP/s | SDPA GFLOP/s | step TFLOP | roofline (s) | ours: of roofline | "
              "diffusers: of roofline | ours: of GEMM rate | diffusers: of GEMM rate |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for case in ok_cases(results):
        r, ours, theirs = case["roofline"], case["ours"]["summary"], case["diffusers"]["summary"]
        lines.append(f"| {case['dtype']} | {case['size']}² | {r['gemm_gflops']:.0f} | {r['sdpa_gflops']:.0f} | "
                     f"{case['step_flops'] / 1e12:.2f} | {r['roofline_s']:.2f} | {ours['roofline_fraction']:.1%} | "
                     f"{theirs['roofline_fraction']:.1%} | {ours['gemm_fraction']:.1%} | {theirs['gemm_fraction']:.1%} |")
    failed = [f"- {c['dtype']} {c['size']}²: {c['error']}" for c in results["cases"] if "error" in c]
    if failed:
        lines += ["", "Cases that could not be measured:", *failed]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    colours = {"float32": "tab:blue", "bfloat16": "tab:orange"}
    for dtype in dict.fromkeys(c["dtype"] for c in ok_cases(results)):
        cases = sorted((c for c in ok_cases(results) if c["dtype"] == dtype), key=lambda c: c["size"])
        sizes = [c["size"] for c in cases]
        axes.plot(sizes, [c["ours"]["summary"]["step_s"] for c in cases], "o-", color=colours.get(dtype), label=f"ours, {dtype}")
        axes.plot(sizes, [c["diffusers"]["summary"]["step_s"] for c in cases], "s--", color=colours.get(dtype), label=f"diffusers, {dtype}")
        axes.plot(sizes, [c["roofline"]["roofline_s"] for c in cases], "x:", color=colours.get(dtype), alpha=0.6, label=f"roofline, {dtype}")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    sizes = sorted({c["size"] for c in ok_cases(results)})
    axes.set_xticks(sizes, [f"{size}²" for size in sizes])
    axes.set_xlabel("image size (pixels)")
    axes.set_ylabel("transformer time per step (s)")
    t = results["config"]["transformer"]
    axes.set_title(f"FLUX.1 step, width {t['num_attention_heads'] * t['attention_head_dim']}, "
                   f"{t['num_layers']} double + {t['num_single_layers']} single blocks, {results['machine']['threads']} threads", fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", type=Path, default=Path("/tmp/flux-benchmark-snapshot"),
                        help="where the synthetic repository is built (once) and read from")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--steps", nargs="+", default=["float32:256=2,512=2,1024=1", "bfloat16:256=1,512=1,1024=1"],
                        help="steps per call, as DTYPE:SIZE=STEPS,...; sizes not listed get 1")
    parser.add_argument("--decode", nargs="*", default=["float32:256,512", "bfloat16:256"],
                        help="where the calls decode, as DTYPE:SIZE,...; elsewhere they stop at the latents")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--roofline-reps", type=int, default=1, help="timed repetitions per operation, after one warm-up")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--t5-layers", type=int, default=2)
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="ours with Pipeline.from_pretrained(quantize=...); diffusers as it is")
    parser.add_argument("--worker", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--roofline-case", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.snapshot, getattr(torch, args.dtypes[0]), args.threads, args.quantize)
        return
    if args.roofline_case:
        config = json.loads((args.snapshot / "transformer" / "config.json").read_text())
        report(roofline(config, args.roofline_case, getattr(torch, args.dtypes[0]), args.threads, args.roofline_reps))
        return
    steps, decode = {dtype: {size: 1 for size in args.sizes} for dtype in args.dtypes}, {dtype: [] for dtype in args.dtypes}
    for item in args.steps:
        dtype, _, spec = item.partition(":")
        for pair in filter(None, spec.split(",")):
            if dtype in steps:
                steps[dtype][int(pair.split("=")[0])] = int(pair.split("=")[1])
    for item in args.decode:
        dtype, _, spec = item.partition(":")
        if dtype in decode:
            decode[dtype] = [int(size) for size in filter(None, spec.split(","))]
    args.steps, args.decode = steps, decode
    results = measure(args)
    write(results, args.out)
    print(markdown(results))


if __name__ == "__main__":
    main()
