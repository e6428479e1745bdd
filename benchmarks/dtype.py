"""The compute dtype flux picks by default, against the other, on this CPU and on one without bf16 instructions.

    python -m benchmarks.dtype [--sizes 256 512] [--reps 3] [--double 1 --single 2]

`Pipeline.from_pretrained(dtype=None)` computes in bf16 where the CPU has bf16 instructions (AVX-512 BF16 or AMX)
and in fp32 where it has not (flux/pipelines/devices.py). This measures why, side by side in one run: the
transformer step at the real width (3072, reduced depth) in fp32 and bf16, each in a fresh process, twice —

- `native`: oneDNN uses every instruction this CPU has;
- `no-bf16`: oneDNN limited to AVX-512 with VNNI (`ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI`), the instruction set of
  an Intel Cascade Lake, so bf16 GEMMs run emulated as they do there.

The sides alternate (fp32, bf16, fp32, bf16, ...) so that a change in the machine's load hits both. Each figure is
the median of `--reps` steps after a warm-up, wall and CPU time. The table says which dtype the default picks on
this CPU and what the no-bf16 CPU gets from the same rule.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ISAS = {"native": None, "no-bf16": "AVX512_CORE_VNNI"}


def worker(snapshot: Path, dtype_name: str, size: int, reps: int) -> dict:
    """One (dtype, size) in this process: the median step time."""
    import torch

    from benchmarks.variants import timed
    from flux.pipelines.sampling import image_ids, text_ids
    from flux.weights.loading import load_flow_model

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    model = load_flow_model(snapshot, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    text = 256
    inputs = dict(img=torch.randn(1, (size // 16) ** 2, 64, generator=generator), img_ids=image_ids(1, size, size),
                  txt=torch.randn(1, text, 4096, generator=generator), txt_ids=text_ids(1, text),
                  timesteps=torch.full((1,), 0.5), y=torch.randn(1, 768, generator=generator))
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.inference_mode():
        return timed(lambda: model(**inputs), reps)


def run(snapshot: Path, dtype_name: str, size: int, reps: int, isa: str | None) -> dict:
    env = dict(os.environ)
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    code = ("import json, sys; from pathlib import Path; from benchmarks.dtype import worker; "
            f"print(json.dumps(worker(Path({str(snapshot)!r}), {dtype_name!r}, {size}, {reps})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", type=Path, default=Path("/tmp/flux-dtype-snapshot"))
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dtype.json")
    args = parser.parse_args()

    import torch

    from benchmarks.compare import machine
    from benchmarks.snapshot import build
    from flux.pipelines.devices import cpu_has_bf16, default_dtype

    snapshot = build(args.snapshot, double=args.double, single=args.single, t5_layers=1)
    info = machine(torch.get_num_threads())
    picked = str(default_dtype("cpu")).removeprefix("torch.")
    print(f"{info['cpu']}, {info['cores']} cores, avx512_bf16={info['avx512_bf16']}, amx_bf16={info['amx_bf16']}, "
          f"load average at start {info['load_average_at_start']}")
    print(f"default compute dtype here: {picked} (cpu_has_bf16={cpu_has_bf16()})\n")
    rows = []
    for size in args.sizes:
        for isa_name, isa in ISAS.items():
            result = {name: run(snapshot, name, size, args.reps, isa) for name in ("fp32", "bf16")}
            rows.append({"size": size, "isa": isa_name, **result})
            print(f"{size}² {isa_name:8s} fp32 {result['fp32']['wall_s']:.2f} s  bf16 {result['bf16']['wall_s']:.2f} s  "
                  f"bf16/fp32 {result['bf16']['wall_s'] / result['fp32']['wall_s']:.2f}", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)  # after every row: a long run keeps what it has
            args.out.write_text(json.dumps({"machine": info, "default_here": picked, "double": args.double,
                                            "single": args.single, "rows": rows}, indent=1))
    print("\n| size | oneDNN instructions | fp32 step (s) | bf16 step (s) | bf16 / fp32 | default picks |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for row in rows:
        default = picked if row["isa"] == "native" else "fp32"  # the rule, on a CPU without bf16 instructions
        print(f"| {row['size']}² | {row['isa']} | {row['fp32']['wall_s']:.2f} | {row['bf16']['wall_s']:.2f} | "
              f"{row['bf16']['wall_s'] / row['fp32']['wall_s']:.2f} | {default} |")


if __name__ == "__main__":
    main()
