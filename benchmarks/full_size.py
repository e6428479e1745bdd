"""The full FLUX.1-schnell on this 2-core, 23 GiB machine: one 256² image in 4 steps, ours, then diffusers'.

    python -m benchmarks.full_size                     # builds /tmp/flux-full-size once (~22 GB), runs every side
    python -m benchmarks.full_size --sides ours --keep-freed-memory   # one side, glibc keeping freed memory
    # --root, --size, --steps, --limit-gib, --need-gib: see --help. Sides not run keep their earlier results.

The files, random weights in the official layouts, each written once, one tensor at a time
(`flux.weights.checkpoint.write_safetensors`), so that building them never holds a model in memory:
  - `flux1-schnell-fp8-scaled.safetensors`: the whole transformer (`configs["flux-schnell"]`: 19 double + 38
    single blocks, 11.9 B parameters) as `flux.weights.fp8.save_fp8` writes it, ComfyUI's scaled fp8 layout: the
    blocks' weights in e4m3 with one `scale_weight` each, the embedders, final layer, biases and norms in
    bf16, and the `scaled_fp8` marker; 12.0 GB;
  - `text_encoder_2/`: T5-XXL's encoder at full size (24 layers, vocabulary 32128, 4.76 B parameters) in bf16,
    the official files' dtype; 9.5 GB. bf16 rather than fp8: it loads zero-copy from the memory map, its
    9.5 GB peak comes and goes before the transformer's 12 GB, and T5 is known to lose more than the
    transformer to fp8 storage; it costs about a minute of bf16 arithmetic, once per prompt;
  - the rest from `benchmarks/snapshot.py`: CLIP-L's text tower (fp16), the official autoencoder (fp32, both
    layouts), the scheduler, small tokenizers (only the vocabularies are small, as in that snapshot).

Each side runs in a process of its own, watched by this one: it reads the child's VmRSS from
/proc/<pid>/status every 0.2 s and kills it beyond `--limit-gib` (default 20 GiB) — first asking it, with
SIGUSR1 (faulthandler), for the Python stack it was at — so the OOM killer is never let loose on a shared
machine. Each child starts only when /proc/meminfo's MemAvailable is at least `--need-gib` (21 GiB).

Ours, in the order that keeps memory lowest: T5 and CLIP (bf16, memory-mapped) encode the prompt and are
freed; the transformer is loaded with fp8 storage and fp32 arithmetic (`flux.weights.fp8.load_fp8_flow_model`; fp32
is ~4× faster than bf16 on this CPU) and makes the 4 steps, and is freed; the autoencoder (fp32) decodes.
These are the phases of `flux.Pipeline.__call__`, run one component at a time. diffusers: its documented way to
read a single-file transformer, `FluxTransformer2DModel.from_single_file(<the fp8 file>, torch_dtype=bf16)`,
then `FluxPipeline.from_pretrained(<the folder>, transformer=..., torch_dtype=bf16)` and the same call.
fp8-cost: what fp8 storage adds to a step, on a few blocks at the real width (`fp8_cost`).

Writes `benchmarks/results/full_size.json` (every phase, both timelines of resident memory) and `full_size.md`.
"""

import argparse
import faulthandler
import gc
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FP8_FILE = "flux1-schnell-fp8-scaled.safetensors"
TEXT_TOKENS = 256  # FLUX.1-schnell's T5 length
GIB = 2**30


# --------------------------------------------------------------------------------------------------
# The files
# --------------------------------------------------------------------------------------------------

def build(root: Path, *, seed: int = 0) -> Path:
    """Writes the full-size repository into `root` unless a finished build is already there."""
    from flux.modules.configs import configs
    from flux.modules.t5 import T5_XXL

    from benchmarks.snapshot import build as build_snapshot

    recipe = {"transformer": "flux-schnell", "t5": "t5-v1_1-xxl", "fp8": "scaled e4m3fn", "seed": seed}
    stamp = root / "full_size.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return root
    free = os.statvfs(root.parent if not root.exists() else root)
    if free.f_bavail * free.f_frsize < 25e9:
        raise SystemExit(f"{root}: the full-size files need about 22 GB on disk and 25 GB are not free")
    started = time.perf_counter()
    # Tokenizers, CLIP, the autoencoder, the scheduler and the configs, with a reduced transformer and T5 whose
    # weights are replaced below.
    build_snapshot(root, double=1, single=1, t5_layers=1, seed=seed)
    for stale in [root / "flux1-schnell.safetensors", *(root / "transformer").glob("diffusion_pytorch_model*"),
                  *(root / "text_encoder_2").glob("model*.safetensors*")]:
        stale.unlink(missing_ok=True)
    params = configs["flux-schnell"].params
    update_json(root / "transformer" / "config.json", num_layers=params.depth, num_single_layers=params.depth_single_blocks)
    log(f"writing {root / FP8_FILE}")
    write_transformer(root / FP8_FILE, seed=seed)
    update_json(root / "text_encoder_2" / "config.json", num_layers=T5_XXL.num_layers, vocab_size=T5_XXL.vocab_size)
    log(f"writing {root / 'text_encoder_2' / 'model.safetensors'}")
    write_t5(root / "text_encoder_2" / "model.safetensors", seed=seed)
    stamp.write_text(json.dumps(recipe))
    log(f"built {root} in {time.perf_counter() - started:.0f} s")
    return root


def write_transformer(path: Path, *, seed: int) -> None:
    """The full transformer in the layout `flux.weights.fp8.save_fp8` writes (its state dict and the marker), each block
    weight drawn in fp32 and quantized (`flux.weights.fp8.quantize`) just before it is written."""
    from flux.weights.checkpoint import write_safetensors
    from flux.modules.configs import configs
    from flux.weights.fp8 import FP8, MARKER, quantize, to_fp8
    from flux.modules.transformer import Flux

    with torch.device("meta"):
        layout = {name: (tuple(t.shape), t.dtype)
                  for name, t in to_fp8(Flux(configs["flux-schnell"].params).to(torch.bfloat16)).state_dict().items()}
    layout[MARKER] = ((2,), FP8)

    def tensors():
        scales = {}  # each layer's scale, made with its weight and written after its bias (the state dict's order)
        for index, (name, (shape, dtype)) in enumerate(layout.items()):
            if name == MARKER:
                yield name, torch.zeros(2, dtype=FP8)
            elif name in scales:
                yield name, scales.pop(name)
            elif dtype == FP8:
                weight, scales[name.removesuffix("weight") + "scale_weight"] = quantize(random_weights(name, shape, seed + index))
                yield name, weight
            else:
                yield name, random_weights(name, shape, seed + index).to(dtype)

    write_safetensors(path, layout, tensors(), metadata={"format": "pt"})


def write_t5(path: Path, *, seed: int) -> None:
    """T5-XXL's encoder in bf16 under the Hugging Face names (what `flux.load_t5` and transformers read)."""
    from flux.weights.checkpoint import write_safetensors
    from flux.modules.t5 import T5_XXL, T5Encoder

    with torch.device("meta"):
        layout = {name: (tuple(t.shape), torch.bfloat16) for name, t in T5Encoder(T5_XXL).state_dict().items()}
    tensors = ((name, random_weights(name, shape, seed + index).bfloat16())
               for index, (name, (shape, _)) in enumerate(layout.items()))
    write_safetensors(path, layout, tensors, metadata={"format": "pt"})


def random_weights(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """As benchmarks/snapshot.py draws them: matrices N(0, 0.5/√fan_in), so activations stay moderate through
    57 blocks; norm scales near 1, biases near 0."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator)
    if len(shape) >= 2:
        return values.mul_(0.5 / shape[1] ** 0.5)
    return values.mul_(0.02).add_(1.0 if name.endswith(("scale", "norm.weight")) else 0.0)


def update_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))


# --------------------------------------------------------------------------------------------------
# The children: one side each, reporting "@@{json}" lines on stdout
# --------------------------------------------------------------------------------------------------

class Phases:
    """Times each phase and samples this process's resident memory (/proc/self/status) every 0.2 s."""

    def __init__(self):
        self.start, self.phase, self.records, self.samples = time.perf_counter(), "start", [], []
        threading.Thread(target=self._sample, daemon=True).start()

    def begin(self, phase: str) -> None:
        self.phase = phase
        self.records.append({"phase": phase, "start_s": time.perf_counter() - self.start})
        report({"phase": phase})

    def end(self, **extra) -> None:
        record = self.records[-1]
        record["seconds"] = time.perf_counter() - self.start - record["start_s"]
        self._record()  # at least one sample per phase, however short
        record["max_vmrss_gib"] = max(s[1] for s in self.samples if s[3] == record["phase"])
        record["ru_maxrss_gib"] = ru_maxrss_gib()
        record.update(extra)
        log(f"{record['phase']}: {record['seconds']:.1f} s, VmRSS max {record['max_vmrss_gib']:.2f} GiB")

    def _sample(self) -> None:
        while True:
            self._record()
            time.sleep(0.2)

    def _record(self) -> None:
        status = memory_status("self")
        self.samples.append((round(time.perf_counter() - self.start, 2), status.get("VmRSS", 0) / GIB,
                             status.get("RssFile", 0) / GIB, self.phase))


def ours(root: Path, size: int, steps: int) -> dict:
    from PIL import Image

    from benchmarks.snapshot import PROMPT
    from flux.modules.configs import configs
    from flux.weights.fp8 import FP8, load_fp8_flow_model
    from flux.weights.loading import load_autoencoder, load_clip, load_t5
    from flux.pipelines.sampling import denoise, get_noise, get_schedule, image_ids, pack, text_ids, unpack

    phases = Phases()
    phases.begin("load T5 (bf16, memory-mapped)")
    t5 = load_t5(root, max_length=TEXT_TOKENS, dtype=torch.bfloat16)
    phases.end()
    phases.begin("load CLIP (bf16)")
    clip = load_clip(root, dtype=torch.bfloat16)
    phases.end()
    with torch.inference_mode():
        phases.begin("T5 encoding (bf16)")
        txt = t5([PROMPT]).float()
        phases.end()
        phases.begin("CLIP encoding (bf16)")
        vec = clip([PROMPT]).float()
        phases.end()
    del t5, clip
    gc.collect()  # the text encoders' memory maps close with their last tensor

    phases.begin("load transformer (fp8 storage, fp32 compute)")
    model = load_fp8_flow_model(root, dtype=torch.float32)
    fp8_bytes = sum(p.numel() for p in model.parameters() if p.dtype == FP8)
    fp32_bytes = sum(4 * p.numel() for p in model.parameters() if p.dtype == torch.float32)
    phases.end(parameter_gib={"fp8": fp8_bytes / GIB, "fp32": fp32_bytes / GIB})
    step_times, step_start = [], []
    model.register_forward_pre_hook(lambda *_: step_start.append(time.perf_counter()))
    model.register_forward_hook(lambda *_: step_times.append(time.perf_counter() - step_start[-1]))
    with torch.inference_mode():
        phases.begin(f"denoise: {steps} steps at {size}²")
        x = pack(get_noise(1, size, size, seed=0))
        timesteps = get_schedule(steps, x.shape[1], shift=configs["flux-schnell"].sampling.shift_schedule)
        x = denoise(model, x, image_ids(1, size, size), txt, text_ids(1, txt.shape[1]), vec, timesteps,
                    progress=lambda s: log_steps(s, step_times))
        phases.end(step_s=step_times)
    del model
    gc.collect()

    phases.begin("load autoencoder (fp32)")
    ae = load_autoencoder(root, dtype=torch.float32)
    phases.end()
    with torch.inference_mode():
        phases.begin("decode (fp32)")
        pixels = ((ae.decode(unpack(x, size, size)) + 1) / 2).clamp(0, 1)
        phases.end()
    image = root / "ours.png"
    Image.fromarray((pixels[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(image)
    total = time.perf_counter() - phases.start
    return {"phases": phases.records, "total_s": total, "ru_maxrss_gib": ru_maxrss_gib(),
            "max_vmrss_gib": max(s[1] for s in phases.samples), "samples": phases.samples[::5], "image": str(image),
            "image_finite": bool(torch.isfinite(pixels).all())}


def log_steps(steps, step_times):
    for index, step in enumerate(steps):
        yield step
        log(f"step {index + 1}/{len(steps)}: {step_times[-1]:.1f} s")


def diffusers_side(root: Path, size: int, steps: int) -> dict:
    import diffusers
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from benchmarks.snapshot import PROMPT

    diffusers.utils.logging.disable_progress_bar()
    phases = Phases()
    phases.begin("load transformer: FluxTransformer2DModel.from_single_file(fp8 file, torch_dtype=bf16)")
    transformer = FluxTransformer2DModel.from_single_file(root / FP8_FILE, config=str(root), subfolder="transformer",
                                                          torch_dtype=torch.bfloat16)
    phases.end()
    phases.begin("load the rest: FluxPipeline.from_pretrained(folder, transformer=..., torch_dtype=bf16)")
    pipe = FluxPipeline.from_pretrained(root, transformer=transformer, torch_dtype=torch.bfloat16)
    phases.end()
    phases.begin(f"call: {steps} steps at {size}², bf16")
    pipe(PROMPT, width=size, height=size, num_inference_steps=steps, guidance_scale=0.0,
         max_sequence_length=TEXT_TOKENS, generator=torch.Generator("cpu").manual_seed(0))
    phases.end()
    return {"phases": phases.records, "total_s": time.perf_counter() - phases.start, "ru_maxrss_gib": ru_maxrss_gib(),
            "max_vmrss_gib": max(s[1] for s in phases.samples), "samples": phases.samples[::5]}


def fp8_cost(root: Path, size: int, steps: int) -> dict:
    """What fp8 storage costs in a step, which the full model cannot show (in fp32 it would need 47.6 GB): one
    double and two single blocks at the real width, in one process, with fp32 weights and with the same
    weights in fp8, upcast by `flux.weights.fp8.upcast` and by PyTorch's own conversion; calls interleaved, the fastest
    of 3 each. The overhead per block weight, times FLUX.1's 11.83 B, estimates it for a full step."""
    import copy
    from dataclasses import replace

    import flux.weights.fp8
    from flux.modules.configs import configs
    from flux.modules.transformer import Flux
    from flux.pipelines.sampling import image_ids, text_ids

    params = replace(configs["flux-schnell"].params, depth=1, depth_single_blocks=2)
    torch.manual_seed(0)
    full_precision = Flux(params).eval()
    stored = flux.weights.fp8.to_fp8(copy.deepcopy(full_precision))
    block_weights = sum(layer.weight.numel() for layer in flux.weights.fp8.fp8_layers(stored).values())
    tokens = (size // 16) ** 2
    inputs = (torch.randn(1, tokens, 64), image_ids(1, size, size), torch.randn(1, TEXT_TOKENS, 4096),
              text_ids(1, TEXT_TOKENS), torch.tensor([0.5]), torch.randn(1, 768))
    upcast = flux.weights.fp8.upcast
    variants = {"fp32 weights": (full_precision, upcast), "fp8, upcast through fp16 bits (flux.weights.fp8.upcast)": (stored, upcast),
                "fp8, upcast by PyTorch's .to()": (stored, lambda weight, dtype: (weight.to(dtype), 1.0))}
    times = {name: [] for name in variants}
    with torch.inference_mode():
        for _ in range(4):  # the first round warms up
            for name, (model, upcast_) in variants.items():
                flux.weights.fp8.upcast = upcast_  # what Fp8Linear.forward calls
                start = time.perf_counter()
                model(*inputs)
                times[name].append(time.perf_counter() - start)
    flux.weights.fp8.upcast = upcast
    fastest = {name: min(seconds[1:]) for name, seconds in times.items()}
    base = fastest["fp32 weights"]
    return {"blocks": "1 double + 2 single at width 3072", "tokens": tokens + TEXT_TOKENS, "block_weights": block_weights,
            "forward_s": fastest, "all_s": times, "overhead_s": {name: t - base for name, t in fastest.items()},
            "full_step_overhead_s": {name: (t - base) / block_weights * 11_834_228_736 for name, t in fastest.items()}}


def child(side: str, root: Path, size: int, steps: int) -> None:
    if side == "build":
        build(root)
        return
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the watchdog's "where are you?" before it kills
    run = {"ours": ours, "diffusers": diffusers_side, "fp8-cost": fp8_cost}[side]
    report({"result": run(root, size, steps)})


# --------------------------------------------------------------------------------------------------
# The driver: a watchdog per child
# --------------------------------------------------------------------------------------------------

# glibc returns every block above its mmap threshold (32 MB at most) to the kernel when it is freed, so each
# call's upcast weights and large activations are fresh pages, faulted in one by one. These keep freed memory
# for reuse instead (`--keep-freed-memory`); jemalloc or tcmalloc would do the same.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36),
                     "MALLOC_TOP_PAD_": str(2**30)}


def watch(side: str, args) -> dict:
    """Runs one side's child; kills it (after asking for its stack) when its VmRSS passes the limit."""
    stderr_path = args.root / f"{side}.stderr"
    command = [sys.executable, "-m", "benchmarks.full_size", "--child", side, "--root", str(args.root),
               "--size", str(args.size), "--steps", str(args.steps)]
    environment = dict(os.environ, HF_HUB_OFFLINE="1", DIFFUSERS_VERBOSITY="error", TRANSFORMERS_VERBOSITY="error",
                       **(KEEP_FREED_MEMORY if args.keep_freed_memory else {}))
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True, env=environment)
    messages = []

    def read():
        for line in process.stdout:
            if line.startswith("@@"):
                messages.append(json.loads(line[2:]))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    start, samples, killed = time.perf_counter(), [], None
    while process.poll() is None:
        rss = memory_status(process.pid).get("VmRSS", 0) / GIB
        phase = next((m["phase"] for m in reversed(messages) if "phase" in m), "start")
        samples.append((round(time.perf_counter() - start, 2), round(rss, 3), phase))
        if rss > args.limit_gib:
            process.send_signal(signal.SIGUSR1)
            time.sleep(0.3)
            final = memory_status(process.pid).get("VmRSS", 0) / GIB
            process.kill()
            killed = {"at_s": samples[-1][0], "vmrss_gib": rss, "vmrss_gib_at_kill": final, "phase": phase}
            log(f"{side}: killed at {rss:.2f} GiB VmRSS (limit {args.limit_gib}) in phase: {phase}")
            break
        time.sleep(0.2)
    process.wait()
    reader.join(timeout=5)
    result = next((m["result"] for m in messages if "result" in m), None)
    record = {"exit_code": process.returncode, "watchdog_samples": samples[::5],
              "watchdog_max_vmrss_gib": max((s[1] for s in samples), default=None),
              "phases_started": [m["phase"] for m in messages if "phase" in m], "stderr": str(stderr_path)}
    if killed:
        record.update(status="killed by the watchdog", killed=killed, stack=stack_at_kill(stderr_path))
    elif result is None:
        record.update(status="failed", stderr_tail=stderr_path.read_text()[-3000:])
    else:
        record.update(status="finished", result=result)
    return record


def stack_at_kill(stderr_path: Path) -> list[str]:
    """The main thread's frames from faulthandler's dump (one block per thread), innermost first."""
    blocks, block = [], []
    for line in stderr_path.read_text().splitlines():
        if line.startswith(("Thread 0x", "Current thread 0x")):
            blocks.append(block := [])
        elif line.strip().startswith("File") and blocks:
            block.append(line.strip())
    return next((b for b in blocks if any(" in child" in frame for frame in b)), [])


def wait_for_memory(need_gib: float, minutes: float) -> float:
    """Waits until MemAvailable reaches `need_gib` (checking each minute); returns it in GiB."""
    deadline = time.time() + 60 * minutes
    while True:
        available = memory_available_gib()
        if available >= need_gib:
            return available
        if time.time() > deadline:
            raise SystemExit(f"only {available:.1f} GiB available after {minutes} minutes; need {need_gib}")
        log(f"{available:.1f} GiB available, waiting for {need_gib} (load average {os.getloadavg()[0]:.1f})")
        time.sleep(60)


def memory_status(pid) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process, in bytes ({} once it has gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return {key: int(value.split()[0]) * 1024 for key, value in (line.split(":", 1) for line in status)
                    if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}
    except (FileNotFoundError, ProcessLookupError):
        return {}


def memory_available_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        return next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:")) * 1024 / GIB


def ru_maxrss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux reports KiB


def report(record: dict) -> None:
    print("@@" + json.dumps(record), flush=True)  # marked, so that library output on stdout cannot interfere


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    lines = ["# The full FLUX.1-schnell on this machine", "", f"Files, in `{results['root']}`:", ""]
    lines += [f"- `{name}`: {size / 1e9:.2f} GB" for name, size in results["files"].items()]
    for key, record in results.items():  # "ours", "diffusers", "fp8-cost", each maybe with ", glibc keeping ..."
        if not (isinstance(record, dict) and "status" in record):
            continue
        side, machine_ = key.split(",")[0], record["machine"]
        environment = " ".join(f"{k}={v}" for k, v in record.get("environment", {}).items())
        lines += ["", f"## {key.replace('fp8-cost', 'what fp8 storage costs per step')}: {record['status']}", "",
                  f"`{record['command']}`, {machine_['date']}: {record['size']}², {record['steps']} steps; "
                  f"{machine_['cores']} cores, {machine_['memory_gib']:.1f} GiB, "
                  f"{record['memory_available_at_start_gib']:.1f} GiB available and load average "
                  f"{machine_['load_average_at_start'][0]:.1f} at the start" + (f"; `{environment}`." if environment else "."), ""]
        result = record.get("result", {})
        if side == "fp8-cost" and result:
            lines += [f"{result['blocks']}, {result['tokens']} tokens, {result['block_weights'] / 1e9:.2f} B block "
                      "weights; the fastest of 3 calls each, interleaved:", "",
                      "| weights | forward (s) | over fp32 (s) | the same for FLUX.1's 11.83 B (s per step) |",
                      "| --- | ---: | ---: | ---: |"]
            lines += [f"| {name} | {seconds:.2f} | {result['overhead_s'][name]:.2f} | "
                      f"{result['full_step_overhead_s'][name]:.1f} |" for name, seconds in result["forward_s"].items()]
        elif result:
            lines += ["| phase | seconds | VmRSS max (GiB) | ru_maxrss so far (GiB) |", "| --- | ---: | ---: | ---: |"]
            lines += [f"| {p['phase']} | {p['seconds']:.1f} | {p['max_vmrss_gib']:.2f} | {p['ru_maxrss_gib']:.2f} |"
                      for p in result["phases"]]
            lines += ["", f"End to end {result['total_s']:.0f} s; peak resident memory: ru_maxrss "
                      f"{result['ru_maxrss_gib']:.2f} GiB, sampled VmRSS {result['max_vmrss_gib']:.2f} GiB "
                      f"(watchdog's samples: {record['watchdog_max_vmrss_gib']:.2f} GiB)."]
            steps = next((p["step_s"] for p in result["phases"] if "step_s" in p), None)
            if steps:
                lines.append("Transformer steps: " + ", ".join(f"{s:.1f} s" for s in steps) + ".")
            stored = next((p["parameter_gib"] for p in result["phases"] if "parameter_gib" in p), None)
            if stored:
                lines.append(f"Transformer parameters: {stored['fp8']:.2f} GiB in fp8, {stored['fp32']:.2f} GiB in fp32.")
        if "killed" in record:
            killed = record["killed"]
            lines += [f"Killed after {killed['at_s']:.0f} s at VmRSS {killed['vmrss_gib']:.2f} GiB (limit "
                      f"{record['limit_gib']} GiB), during: {killed['phase']}. Where (innermost first):", ""]
            # Without the frames every module call and decorator adds.
            wrappers = ("torch/nn/modules/module.py", "_contextlib.py", "transformers/utils/", "huggingface_hub/utils/")
            lines += [f"    {frame}" for frame in record["stack"] if not any(w in frame for w in wrappers)]
        if "stderr_tail" in record:
            lines += ["", "```", record["stderr_tail"][-1500:], "```"]
    return "\n".join(lines) + "\n"


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    with open("/proc/meminfo") as meminfo:
        total = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:")) * 1024
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": total / GIB, "torch": torch.__version__,
            "load_average_at_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/flux-full-size"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sides", nargs="+", default=["ours", "diffusers", "fp8-cost"],
                        choices=["ours", "diffusers", "fp8-cost"])
    parser.add_argument("--limit-gib", type=float, default=20.0, help="the watchdog kills a child above this VmRSS")
    parser.add_argument("--need-gib", type=float, default=21.0, help="start a child only with this much MemAvailable")
    parser.add_argument("--wait-minutes", type=float, default=60.0)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="run the children with glibc keeping freed memory for reuse (see KEEP_FREED_MEMORY)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--child", choices=["build", "ours", "diffusers", "fp8-cost"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.root, args.size, args.steps)

    # In a process of its own, so that this one, which stays up through every run, stays small.
    subprocess.run([sys.executable, "-m", "benchmarks.full_size", "--child", "build", "--root", str(args.root)],
                   cwd=ROOT, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    path = args.out / "full_size.json"
    results = json.loads(path.read_text()) if path.is_file() else {}  # the sides not run now are kept
    results.update(root=str(args.root), files={str(p.relative_to(args.root)): p.stat().st_size
                                               for p in sorted(args.root.rglob("*.safetensors"))})
    for side in args.sides:
        available = wait_for_memory(args.need_gib, args.wait_minutes)
        log(f"{side}: starting")
        setting = {"command": " ".join(["python -m benchmarks.full_size", *sys.argv[1:]]), "machine": machine(),
                   "memory_available_at_start_gib": available, "size": args.size, "steps": args.steps,
                   "limit_gib": args.limit_gib, "environment": KEEP_FREED_MEMORY if args.keep_freed_memory else {}}
        results[side + (", glibc keeping freed memory" if args.keep_freed_memory else "")] = {**setting, **watch(side, args)}
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
        (args.out / "full_size.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
