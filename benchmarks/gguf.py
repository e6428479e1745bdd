"""GGUF storage against bf16 and fp8, at FLUX.1's real width, and the full 11.9 B schnell from Q4_0.

    python -m benchmarks.gguf                      # the formats side by side (a few minutes), then the full size
    python -m benchmarks.gguf --parts formats      # one part; --sizes, --root, --limit-gib: see --help

formats: one double and two single blocks at width 3072 (24 heads of 128), random weights, stored as
  - "bf16": the official files' dtype, loaded as a user on this CPU would (`load_flow_model(dtype=<compute>)`,
    so on a CPU without bf16 arithmetic the weights are held in fp32);
  - "fp8": `load_fp8_flow_model` (e4m3 weights, one scale per layer, flux/weights/fp8.py);
  - "Q8_0", "Q4_0": written by `flux quantize` (gguf's quantizers), "Q4_K": random blocks with sane scales (the
    gguf package cannot make K-quants), all loaded by `load_flow_model(<file>.gguf)` and kept quantized.
  Each format runs in a process of its own (so that its peak resident memory, ru_maxrss, is its own), one after
  the other, at each resolution: a warm-up call, then 3 timed calls of the transformer's forward; the median
  is reported. Per layer, the dequantization alone of the widest weight (img_mlp.0, 12288 × 3072) against its
  matrix product at the same token count, and the overhead scaled to FLUX.1's 11.83 B block weights per step.
full: the whole FLUX.1-schnell transformer as Q4_0 (random blocks, written one tensor at a time: never a model in
  memory) with T5-XXL in bf16, CLIP-L and the official autoencoder (the files of benchmarks/full_size.py's
  recipe), generating one 256² image in 4 steps one component at a time, as benchmarks/full_size.py does for
  fp8; in a child process watched by this one (killed beyond --limit-gib), started when enough memory is free.

Writes benchmarks/results/gguf.json and gguf.md, with the CPU's flags beside the figures.
"""

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.full_size import (GIB, TEXT_TOKENS, Phases, log, machine, memory_available_gib, memory_status,
                                  random_weights, report, ru_maxrss_gib, update_json, write_t5)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FORMATS = ["bf16", "fp8", "Q8_0", "Q4_0", "Q4_K"]
BLOCK_WEIGHTS_FLUX = 11_834_228_736  # the Linear weights of FLUX.1's 19 double and 38 single blocks
FULL_FILE = "flux1-schnell-Q4_0.gguf"


def cpu_flags() -> dict:
    """What decides the kernels: PyTorch's CPU capability and the ISA flags that matter for fp32/bf16 GEMMs."""
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile"]
    return {"capability": torch.backends.cpu.get_cpu_capability(), "flags": [f for f in wanted if f in flags],
            "missing": [f for f in wanted if f not in flags], "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------------------------------
# The files
# --------------------------------------------------------------------------------------------------

def random_q_blocks(kind: str, shape: tuple[int, int], seed: int):
    """(rows, bytes per row) uint8 GGUF blocks of `kind` with random integers and fp16 scales chosen so that
    the weights are about N(0, 0.5/√fan_in), as `random_weights` draws them (Q4_0's q - 8 has std ≈ 4.6; the
    K-quants' sub-block scales are random bytes, so their super-block scale is set smaller)."""
    import numpy as np

    from flux.weights.gguf_blocks import TYPES

    kind_ = TYPES[kind]
    rng = np.random.default_rng(seed)
    rows, blocks = shape[0], shape[1] // kind_.block
    data = rng.integers(0, 256, (rows * blocks, kind_.bytes), dtype=np.uint8)
    target = 0.5 / shape[1] ** 0.5
    # Q4_K: w = d·sc·q - dmin·m with sc, m random in 0..63 and q in 0..15; dmin ≈ 7.5 d centres it.
    fields = {"Q4_0": [(0, target / 4.6)], "Q4_K": [(0, target / 150), (2, target / 150 * 7.5)]}[kind]
    for start, scale in fields:
        data[:, start:start + 2] = np.full(len(data), scale, np.float16).view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, blocks * kind_.bytes)


def write_random_gguf(path: Path, params, kind: str, *, seed: int = 0) -> None:
    """A transformer of `params` as GGUF: the blocks' 2-D weights random `kind` blocks, the rest F32 (the
    published files' conventions), written one tensor at a time with gguf's GGUFWriter."""
    import gguf
    import numpy as np

    from flux.modules.transformer import Flux
    from flux.weights.gguf_blocks import TYPES
    from flux.weights.gguf_save import type_for

    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in Flux(params).state_dict().items()}
    chosen = {name: type_for(name, shape, "Q4_0") for name, shape in shapes.items()}
    chosen = {name: kind if value == "Q4_0" else value for name, value in chosen.items()}
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, shape in shapes.items():
        type_ = TYPES[chosen[name]]
        writer.add_tensor_info(name, shape, np.float32, math.prod(shape) // type_.block * type_.bytes,
                               raw_dtype=gguf.GGMLQuantizationType[chosen[name]])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for index, (name, shape) in enumerate(shapes.items()):
        if chosen[name] == "F32":
            writer.write_tensor_data(random_weights(name, shape, seed + index).numpy())
        else:
            writer.write_tensor_data(random_q_blocks(chosen[name], shape, seed + index))
    writer.close()
    os.replace(partial, path)


def build_formats(root: Path) -> dict[str, Path]:
    """The few-block transformer in every format's file, written once."""
    from flux.modules.configs import configs
    from flux.modules.transformer import Flux
    from flux.weights.checkpoint import write_safetensors
    from flux.weights.gguf_save import save_gguf
    from flux.weights.loading import load_flow_model

    root.mkdir(parents=True, exist_ok=True)
    params = replace(configs["flux-schnell"].params, depth=1, depth_single_blocks=2)
    files = {"bf16": root / "flux1-3-blocks.safetensors", "Q8_0": root / "3-blocks-Q8_0.gguf",
             "Q4_0": root / "3-blocks-Q4_0.gguf", "Q4_K": root / "3-blocks-Q4_K.gguf"}
    if not files["bf16"].is_file():
        with torch.device("meta"):
            layout = {name: (tuple(t.shape), torch.bfloat16) for name, t in Flux(params).state_dict().items()}
        write_safetensors(files["bf16"], layout, ((name, random_weights(name, shape, index).bfloat16())
                                                  for index, (name, (shape, _)) in enumerate(layout.items())))
    for kind in ("Q8_0", "Q4_0"):
        if not files[kind].is_file():
            save_gguf(load_flow_model(files["bf16"], dtype=torch.bfloat16), files[kind], type=kind, progress=False)
    if not files["Q4_K"].is_file():
        write_random_gguf(files["Q4_K"], params, "Q4_K")
    return {**files, "fp8": files["bf16"]}


# --------------------------------------------------------------------------------------------------
# The formats, side by side: one child per format and resolution
# --------------------------------------------------------------------------------------------------

def format_child(file: Path, fmt: str, size: int) -> dict:
    from flux.pipelines.devices import default_dtype
    from flux.pipelines.sampling import image_ids, text_ids
    from flux.weights.fp8 import load_fp8_flow_model
    from flux.weights.gguf import gguf_layers
    from flux.weights.loading import load_flow_model
    from flux.weights.quantized import QuantizedLinear

    dtype = default_dtype(torch.device("cpu"))
    started = time.perf_counter()
    model = load_fp8_flow_model(file, dtype=dtype) if fmt == "fp8" else load_flow_model(file, dtype=dtype)
    load_s = time.perf_counter() - started
    stored = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    tokens = (size // 16) ** 2
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, tokens, 64, generator=generator, dtype=dtype), image_ids(1, size, size).to(dtype),
              torch.randn(1, TEXT_TOKENS, 4096, generator=generator, dtype=dtype), text_ids(1, TEXT_TOKENS).to(dtype),
              torch.tensor([0.5], dtype=dtype), torch.randn(1, 768, generator=generator, dtype=dtype))
    times = []
    with torch.inference_mode():
        for _ in range(4):  # the first call warms up
            start = time.perf_counter()
            model(*inputs)
            times.append(time.perf_counter() - start)
        # The dequantization alone of the widest layer, and its product at this many tokens (image + text).
        layer = model.double_blocks[0].img_mlp[0]
        x = torch.randn(tokens + TEXT_TOKENS, layer.in_features, dtype=dtype)
        dequantize_s, matmul_s = [], []
        for _ in range(4):
            start = time.perf_counter()
            weight = layer.dequantize(dtype) if isinstance(layer, QuantizedLinear) else layer.weight
            dequantize_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            torch.nn.functional.linear(x, weight)
            matmul_s.append(time.perf_counter() - start)
    block_weights = sum(m.in_features * m.out_features for name, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and name.startswith(("double_blocks", "single_blocks")))
    dequantize = statistics.median(dequantize_s[1:])
    return {"format": fmt, "size": size, "dtype": str(dtype), "load_s": load_s, "forward_s": times[1:],
            "forward_median_s": statistics.median(times[1:]), "stored_gib": stored / GIB,
            "quantized_layers": len(gguf_layers(model)), "ru_maxrss_gib": ru_maxrss_gib(),
            "widest_layer": {"dequantize_s": dequantize, "matmul_s": statistics.median(matmul_s[1:]),
                             "weights": layer.in_features * layer.out_features},
            "dequantize_per_flux_step_s": dequantize / (layer.in_features * layer.out_features) * BLOCK_WEIGHTS_FLUX,
            "block_weights": block_weights}


def run_child(arguments: list[str], *, limit_gib: float) -> dict:
    """Runs `python -m benchmarks.gguf --child ...`; kills it beyond `limit_gib` of VmRSS; returns its result."""
    command = [sys.executable, "-m", "benchmarks.gguf", "--child", *arguments]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, HF_HUB_OFFLINE="1"))
    peak = 0.0
    while process.poll() is None:
        rss = memory_status(process.pid).get("VmRSS", 0) / GIB
        peak = max(peak, rss)
        if rss > limit_gib:
            process.kill()
            log(f"{arguments}: killed at {rss:.2f} GiB VmRSS (limit {limit_gib})")
            return {"status": "killed by the watchdog", "vmrss_gib": rss}
        time.sleep(0.2)
    lines = [line for line in process.stdout.read().splitlines() if line.startswith("@@")]
    results = [json.loads(line[2:]) for line in lines]
    result = next((r["result"] for r in results if "result" in r), None)
    if result is None:
        return {"status": f"failed (exit code {process.returncode})", "watchdog_max_vmrss_gib": peak}
    return {"status": "finished", **result, "watchdog_max_vmrss_gib": peak}


# --------------------------------------------------------------------------------------------------
# The full size
# --------------------------------------------------------------------------------------------------

def build_full(root: Path, *, seed: int = 0) -> None:
    """The full-size repository with the transformer as Q4_0 (benchmarks/full_size.py's recipe otherwise)."""
    from benchmarks.snapshot import build as build_snapshot
    from flux.modules.configs import configs
    from flux.modules.t5 import T5_XXL

    recipe = {"transformer": "flux-schnell Q4_0", "t5": "t5-v1_1-xxl bf16", "seed": seed}
    stamp = root / "gguf_full_size.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return
    build_snapshot(root, double=1, single=1, t5_layers=1, seed=seed)
    for stale in [root / "flux1-schnell.safetensors", *(root / "transformer").glob("diffusion_pytorch_model*"),
                  *(root / "text_encoder_2").glob("model*.safetensors*")]:
        stale.unlink(missing_ok=True)
    log(f"writing {root / FULL_FILE}")
    write_random_gguf(root / FULL_FILE, configs["flux-schnell"].params, "Q4_0", seed=seed)
    update_json(root / "text_encoder_2" / "config.json", num_layers=T5_XXL.num_layers, vocab_size=T5_XXL.vocab_size)
    log(f"writing {root / 'text_encoder_2' / 'model.safetensors'}")
    write_t5(root / "text_encoder_2" / "model.safetensors", seed=seed)
    stamp.write_text(json.dumps(recipe))


def full_child(root: Path, size: int, steps: int) -> dict:
    from benchmarks.snapshot import PROMPT
    from flux.modules.configs import configs
    from flux.pipelines.devices import default_dtype
    from flux.pipelines.sampling import denoise, get_noise, get_schedule, image_ids, pack, text_ids, unpack
    from flux.weights.gguf import gguf_layers
    from flux.weights.loading import load_autoencoder, load_clip, load_flow_model, load_t5

    dtype = default_dtype(torch.device("cpu"))
    phases = Phases()
    phases.begin("load T5 (bf16, memory-mapped)")
    t5 = load_t5(root, max_length=TEXT_TOKENS, dtype=torch.bfloat16)
    clip = load_clip(root, dtype=torch.bfloat16)
    phases.end()
    with torch.inference_mode():
        phases.begin("T5 and CLIP encoding (bf16)")
        txt, vec = t5([PROMPT]).to(dtype), clip([PROMPT]).to(dtype)
        phases.end()
    del t5, clip
    gc.collect()
    phases.begin(f"load transformer (Q4_0 kept quantized, {dtype} compute)")
    model = load_flow_model(root / FULL_FILE, dtype=dtype)
    blocks = sum(layer.weight.numel() for layer in gguf_layers(model).values())
    phases.end(quantized_gib=blocks / GIB)
    step_times, step_start = [], []
    model.register_forward_pre_hook(lambda *_: step_start.append(time.perf_counter()))
    model.register_forward_hook(lambda *_: step_times.append(time.perf_counter() - step_start[-1]))
    with torch.inference_mode():
        phases.begin(f"denoise: {steps} steps at {size}²")
        x = pack(get_noise(1, size, size, seed=0)).to(dtype)
        timesteps = get_schedule(steps, x.shape[1], shift=configs["flux-schnell"].sampling.shift_schedule)
        x = denoise(model, x, image_ids(1, size, size), txt, text_ids(1, txt.shape[1]), vec, timesteps)
        phases.end(step_s=step_times)
    del model
    gc.collect()
    phases.begin("load autoencoder and decode (fp32)")
    ae = load_autoencoder(root, dtype=torch.float32)
    with torch.inference_mode():
        pixels = ((ae.decode(unpack(x.float(), size, size)) + 1) / 2).clamp(0, 1)
    phases.end()
    return {"phases": phases.records, "total_s": time.perf_counter() - phases.start, "ru_maxrss_gib": ru_maxrss_gib(),
            "max_vmrss_gib": max(s[1] for s in phases.samples), "image_finite": bool(torch.isfinite(pixels).all()),
            "file_gb": (root / FULL_FILE).stat().st_size / 1e9}


# --------------------------------------------------------------------------------------------------
# The driver and the report
# --------------------------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    flags = results["cpu"]
    lines = ["# GGUF storage", "", f"{results['machine']['cpu']}, {results['machine']['cores']} cores, torch "
             f"{results['machine']['torch']}, CPU capability {flags['capability']}; flags {' '.join(flags['flags'])}; "
             f"without {' '.join(flags['missing']) or 'none'}. Load average {results['machine']['load_average_at_start'][0]:.1f} "
             f"at the start ({results['machine']['date']}).", ""]
    rows = [r for r in results.get("formats", []) if r.get("status") == "finished"]
    if rows:
        lines += ["One double + two single blocks at width 3072 (" f"{rows[0]['block_weights'] / 1e9:.2f} B block weights), "
                  f"compute in {rows[0]['dtype'].removeprefix('torch.')}, median of 3 forwards after a warm-up, each format "
                  "in its own process:", "",
                  "| format | size | forward (s) | peak RSS (GiB) | weights held (GiB) | dequantize widest layer (ms) | its matmul (ms) | dequantize, scaled to a FLUX.1 step (s) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            layer = r["widest_layer"]
            lines.append(f"| {r['format']} | {r['size']}² | {r['forward_median_s']:.2f} | {r['ru_maxrss_gib']:.2f} | "
                         f"{r['stored_gib']:.2f} | {1000 * layer['dequantize_s']:.0f} | {1000 * layer['matmul_s']:.0f} | "
                         f"{r['dequantize_per_flux_step_s']:.1f} |")
    for r in results.get("formats", []):
        if r.get("status") != "finished":
            lines.append(f"- {r.get('format')} at {r.get('size')}²: {r.get('status')}")
    full = results.get("full")
    if full:
        lines += ["", f"## The full FLUX.1-schnell from Q4_0 ({full.get('status')})", ""]
        if full.get("status") == "finished":
            lines += [f"Q4_0 file {full['file_gb']:.2f} GB; {full['memory_available_at_start_gib']:.1f} GiB available "
                      f"and load average {full['load_average_at_start']:.1f} at the start.", "",
                      "| phase | seconds | VmRSS max (GiB) |", "| --- | ---: | ---: |"]
            lines += [f"| {p['phase']} | {p['seconds']:.1f} | {p['max_vmrss_gib']:.2f} |" for p in full["phases"]]
            steps = next((p["step_s"] for p in full["phases"] if "step_s" in p), [])
            lines += ["", f"Peak resident memory: ru_maxrss {full['ru_maxrss_gib']:.2f} GiB (watchdog's samples "
                      f"{full['watchdog_max_vmrss_gib']:.2f} GiB). Steps: {', '.join(f'{s:.0f} s' for s in steps)}. "
                      f"End to end {full['total_s']:.0f} s; image finite: {full['image_finite']}."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["formats", "full"], choices=["formats", "full"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    parser.add_argument("--root", type=Path, default=Path("/tmp/flux-gguf-benchmark"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--limit-gib", type=float, default=14.0, help="the watchdog kills a child above this VmRSS")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "format":
            report({"result": format_child(Path(rest[0]), rest[1], int(rest[2]))})
        else:
            report({"result": full_child(Path(rest[0]), int(rest[1]), int(rest[2]))})
        return

    path = args.out / "gguf.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.update(machine=machine(), cpu=cpu_flags())
    print(json.dumps(results["cpu"]), file=sys.stderr)
    if "formats" in args.parts:
        files = build_formats(args.root / "formats")
        results["formats"] = []
        args.out.mkdir(parents=True, exist_ok=True)
        for size in args.sizes:
            for fmt in args.formats:
                log(f"{fmt} at {size}²")
                record = {"format": fmt, "size": size, **run_child(["format", str(files[fmt]), fmt, str(size)],
                                                                    limit_gib=args.limit_gib)}
                log(f"{fmt} at {size}²: {record.get('status')}, forward {record.get('forward_median_s', 0):.2f} s, "
                    f"peak {record.get('ru_maxrss_gib', 0):.2f} GiB")
                results["formats"].append(record)
                # After each child, re-read so that another part's results written meanwhile are kept.
                saved = json.loads(path.read_text()) if path.is_file() else {}
                path.write_text(json.dumps({**saved, **{k: results[k] for k in ("machine", "cpu", "formats")}}, indent=1))
        results = json.loads(path.read_text())
        (args.out / "gguf.md").write_text(markdown(results))
    if "full" in args.parts:
        full_root = args.root / "full"
        build_full(full_root)
        available = memory_available_gib()
        log(f"full size: starting with {available:.1f} GiB available")
        results["full"] = {"memory_available_at_start_gib": available, "load_average_at_start": os.getloadavg()[0],
                           **run_child(["full", str(full_root), "256", str(args.steps)], limit_gib=args.limit_gib)}
        saved = json.loads(path.read_text()) if path.is_file() else {}
        results = {**saved, "full": results["full"]}
        path.write_text(json.dumps(results, indent=1))
        (args.out / "gguf.md").write_text(markdown(results))
    print((args.out / "gguf.md").read_text())


if __name__ == "__main__":
    main()
