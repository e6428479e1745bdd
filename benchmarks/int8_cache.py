"""int8 W8A8 compute and First-Block-Cache: speed against our bf16 step, and error against the unquantized or
uncached run, side by side in one process.

    python -m benchmarks.int8_cache int8  [--size 512 --runs 3 --compile]  # real-width blocks: bf16 vs int8 step
    python -m benchmarks.int8_cache cache [--steps 28 50]                  # the built-in model, cached vs uncached
    python -m benchmarks.int8_cache cache --real-width [--size 256]        # the same at real width

int8: the synthetic repository's transformer (benchmarks/snapshot.py: real width 3072, 24 heads of 128,
2 double + 4 single blocks, random weights), loaded twice in bf16, one copy quantized with `quantize_int8`; the
two forwards alternate on the same inputs (256 text tokens, size² pixels), after a warm-up each. Reported:
median wall and process CPU time per step, the speed-up, and the int8 step's error against the bf16 one (mean abs
over the output's mean abs). `--compile` compiles both sides' blocks alike (flux/runtime/compile.py), which
fuses the int8 layers' quantization and rescale into the elementwise work around them. Then the built-in model's image (64², 8 steps, bf16) with and without int8: mean abs
difference of pixels in [0, 1].

cache: the built-in model (flux-tiny, fp32, 64²) or with `--real-width` the synthetic repository (bf16, --size²)
sampled dev-style at 28 and 50 steps (the shifted schedule; their own guidance-free models), uncached and with `cache="first-block"` at several thresholds, alternating. Reported: the
steps whose later blocks were skipped, the transformer's process CPU time per generation (its forward calls,
timed by hooks; the text encoders and decode are the same on both sides), the speed-up, and the image error.

Writes `int8.json`/`cache.json` and `.md` into `--out`.
"""

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.machine import log, machine, machine_line
from benchmarks.snapshot import PROMPT, build

HERE = Path(__file__).resolve().parent


def timed(function) -> tuple[float, float]:
    start, start_cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - start, time.process_time() - start_cpu


def int8_step(snapshot: Path, size: int, runs: int, threads: int, compiled: bool = False) -> dict:
    from flux.pipelines.sampling import get_noise, image_ids, pack, text_ids
    from flux.runtime.compile import compile_blocks
    from flux.weights.int8 import cpu_has_int8_dot_products, quantize_int8
    from flux.weights.loading import load_flow_model

    torch.set_num_threads(threads)
    bf16 = load_flow_model(snapshot, dtype=torch.bfloat16)
    int8 = quantize_int8(copy.deepcopy(bf16))
    generator = torch.Generator().manual_seed(0)
    img = pack(get_noise(1, size, size, seed=0)).bfloat16()
    txt = torch.randn(1, 256, bf16.params.context_in_dim, generator=generator).bfloat16()
    vec = torch.randn(1, bf16.params.vec_in_dim, generator=generator).bfloat16()
    ids, tids = image_ids(1, size, size), text_ids(1, 256)
    rope = bf16.rope(ids, tids)
    models = {"bf16": bf16, "int8": int8}
    if compiled:  # both sides alike: the warm-up call below compiles
        for model in models.values():
            compile_blocks(model)
    result = {"machine": machine(threads), "size": size, "runs": runs, "int_mm": cpu_has_int8_dot_products(),
              "compiled": compiled,
              "blocks": [bf16.params.depth, bf16.params.depth_single_blocks], "wall_s": {}, "cpu_s": {},
              "load_average_before": os.getloadavg()[0]}
    outputs = {}
    with torch.inference_mode():
        def step(name):
            return models[name](img, ids, txt, tids, torch.full((1,), 0.7, dtype=torch.bfloat16), vec, rope=rope)
        for name in models:
            outputs[name] = step(name).double()  # the warm-up
        for round_ in range(runs):
            for name in (models if round_ % 2 == 0 else reversed(list(models))):
                wall, cpu = timed(lambda: step(name))
                result["wall_s"].setdefault(name, []).append(wall)
                result["cpu_s"].setdefault(name, []).append(cpu)
                log(f"int8 step {size}²: {name} {wall:.2f} s wall, {cpu:.2f} s CPU")
    result["relative_error"] = ((outputs["int8"] - outputs["bf16"]).abs().mean() / outputs["bf16"].abs().mean()).item()
    result["load_average_after"] = os.getloadavg()[0]
    result["builtin_image_error"] = builtin_int8_image_error()
    return result


def builtin_int8_image_error() -> dict:
    from flux import Pipeline
    from flux.pipelines.snapshots import builtin_model

    errors = {}
    for dtype in (torch.bfloat16, torch.float32):
        images = [Pipeline.from_pretrained(builtin_model(), device="cpu", dtype=dtype, quantize=quantize)(
            PROMPT, seed=0, output_type="pt", progress=False) for quantize in (None, "int8")]
        errors[str(dtype).removeprefix("torch.")] = (images[1] - images[0]).abs().mean().item()
    return errors


def cache_runs(steps_list: list[int], thresholds: list[float], runs: int, threads: int, *, snapshot: Path | None = None,
               size: int = 64) -> dict:
    """The built-in model in fp32 (`snapshot` None) or the synthetic real-width repository in bf16, at size²."""
    from dataclasses import replace

    from flux import Pipeline
    from flux.pipelines.snapshots import builtin_model

    torch.set_num_threads(threads)
    dtype = torch.float32 if snapshot is None else torch.bfloat16
    pipe = Pipeline.from_pretrained(builtin_model() if snapshot is None else snapshot, device="cpu", dtype=dtype)
    pipe.defaults = replace(pipe.defaults, shift_schedule=True)  # dev-style sampling: the shifted schedule
    step_times: list[float] = []
    starts: list[float] = []
    # Process CPU time of each forward: the tiny model's steps take milliseconds, which a busy machine's
    # scheduling would drown in wall time.
    pipe.model.register_forward_pre_hook(lambda *_: starts.append(time.process_time()))
    pipe.model.register_forward_hook(lambda *_: step_times.append(time.process_time() - starts[-1]))
    model = ("built-in flux-tiny, fp32" if snapshot is None else
             "synthetic repository (real width 3072, 2 double + 4 single blocks, random weights), bf16")
    result = {"machine": machine(threads), "runs": runs, "model": f"{model}, {size}², shifted schedule", "cases": []}
    skipped: list[int] = []
    import logging

    class Counter(logging.Handler):  # the pipeline logs how many steps the cache reused: read off its record
        def emit(self, record):
            if record.getMessage().startswith("first-block cache"):
                skipped.append(int(record.getMessage().split()[2]))

    logging.getLogger("flux").addHandler(Counter())
    logging.getLogger("flux").setLevel(logging.INFO)
    for steps in steps_list:
        arguments = dict(width=size, height=size, num_steps=steps, seed=3, output_type="pt", progress=False)
        settings = [None, *thresholds]
        times = {s: [] for s in settings}
        images, reused = {}, {}
        for round_ in range(runs):
            for threshold in (settings if round_ % 2 == 0 else settings[::-1]):
                step_times.clear()
                skipped.clear()
                extra = {} if threshold is None else {"cache": "first-block", "cache_threshold": threshold}
                images[threshold] = pipe(PROMPT, **arguments, **extra)
                times[threshold].append(sum(step_times))
                reused[threshold] = skipped[0] if skipped else 0
        case = {"steps": steps, "settings": []}
        base = statistics.median(times[None])
        for threshold in settings:
            seconds = statistics.median(times[threshold])
            case["settings"].append({"threshold": threshold, "reused_steps": reused[threshold],
                                     "transformer_s": seconds, "speedup": base / seconds,
                                     "image_error": (images[threshold] - images[None]).abs().mean().item()})
            log(f"cache {steps} steps, threshold {threshold}: {reused[threshold]} reused, {seconds:.3f} s, "
                f"error {case['settings'][-1]['image_error']:.4f}")
        result["cases"].append(case)
    return result


def int8_markdown(r: dict) -> str:
    wall = {k: statistics.median(v) for k, v in r["wall_s"].items()}
    cpu = {k: statistics.median(v) for k, v in r["cpu_s"].items()}
    d, s = r["blocks"]
    return "\n".join([
        machine_line(r["machine"]), "",
        f"Real width (3072, 24 heads of 128), {d} double + {s} single blocks, random weights, {r['size']}² "
        f"(+ 256 text tokens), batch 1; {'compiled (compile_blocks, inductor)' if r.get('compiled') else 'eager'}; "
        f"medians of {r['runs']} alternating calls; `torch._int_mm` used: {r['int_mm']}; "
        f"load average {r['load_average_before']:.1f} → {r['load_average_after']:.1f}.", "",
        "| | bf16 | int8 W8A8 | speed-up |", "| --- | ---: | ---: | ---: |",
        f"| step, wall (s) | {wall['bf16']:.2f} | {wall['int8']:.2f} | {wall['bf16'] / wall['int8']:.2f}× |",
        f"| step, process CPU (s) | {cpu['bf16']:.2f} | {cpu['int8']:.2f} | {cpu['bf16'] / cpu['int8']:.2f}× |",
        f"| step output, mean abs error over mean abs | | {r['relative_error']:.2%} | |",
        "", "Built-in model, 64², 8 steps: image (pixels in [0, 1]) mean abs difference int8 vs unquantized: " +
        ", ".join(f"{k} {v:.4f}" for k, v in r["builtin_image_error"].items()) + ".", ""])


def cache_markdown(r: dict) -> str:
    lines = [machine_line(r["machine"]), "", f"{r['model']}; transformer time per generation, medians of {r['runs']} "
             "alternating generations; image error: mean abs difference from the uncached image, pixels in [0, 1].", "",
             "| steps | threshold | steps reused | transformer CPU (s) | speed-up | image error |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for case in r["cases"]:
        for s in case["settings"]:
            lines.append(f"| {case['steps']} | {'off' if s['threshold'] is None else s['threshold']} | "
                         f"{s['reused_steps']} | {s['transformer_s']:.3f} | {s['speedup']:.2f}× | {s['image_error']:.4f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["int8", "cache"])
    parser.add_argument("--snapshot", type=Path, default=Path("/tmp/flux-benchmark-snapshot"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 28, 50])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--real-width", action="store_true",
                        help="cache: the synthetic real-width repository at --size instead of the built-in model")
    parser.add_argument("--compile", action="store_true", help="int8: both sides' blocks through compile_blocks (inductor)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what == "int8":
        r = int8_step(build(args.snapshot), args.size, args.runs, args.threads, compiled=args.compile)
        result, text = r, int8_markdown(r)
    else:
        snapshot = build(args.snapshot) if args.real_width else None
        r = cache_runs(args.steps, args.thresholds, args.runs, args.threads, snapshot=snapshot,
                       size=args.size if args.real_width else 64)
        result, text = r, cache_markdown(r)
    (args.out / f"{args.what}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{args.what}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
