"""The machine a benchmark ran on, recorded beside its figures: CPU, the flags that decide the kernels, load.

The flags that matter here: `avx512_bf16` / `amx_bf16` (native bf16 products; without them oneDNN converts and
bf16 is slower than fp32), `avx512_vnni` / `avx_vnni` / `amx_int8` (native int8 dot products, what
`torch._int_mm` needs to beat bf16). The load average says how shared the machine was while it ran.
"""

import os
import platform
import time

import torch

FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


def machine(threads: int) -> dict:
    with open("/proc/cpuinfo") as cpuinfo:
        lines = cpuinfo.read().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return {"cpu": model, "cores": os.cpu_count(), "threads": threads, "flags": [f for f in FLAGS if f in flags],
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def machine_line(m: dict) -> str:
    return (f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads; CPU flags: {' '.join(m['flags'])}; "
            f"torch {m['torch']}; {m['date']}; load average at the start {m['load_average_at_start']:.1f} "
            "(the load average counts every job on the machine).")


def log(message: str) -> None:
    """A timestamped progress line, for runs that take minutes."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
