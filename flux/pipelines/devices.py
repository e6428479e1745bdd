"""Where and in what dtype to compute when the caller does not say: the fastest the machine has.

bf16 halves the weights' memory and doubles a GPU's matmul rate, but a CPU without bf16 instructions
(no AVX-512 BF16, no AMX) emulates it: there a bf16 matmul runs about 4× slower than fp32 (benchmarks/README.md,
"Compute dtype"). So the default is bf16 on CUDA, MPS and CPUs with native bf16, and fp32 elsewhere.
"""

import functools
import logging
import os

import torch

log = logging.getLogger("flux")


def default_dtype(device) -> torch.dtype:
    """The compute dtype for `device` when none is given: bf16 where the hardware has it, else fp32. Logged once."""
    device = torch.device(device)
    if device.type == "cpu":
        dtype = torch.bfloat16 if cpu_has_bf16() else torch.float32
        _log_choice(str(dtype), "this CPU has native bf16 (AVX-512 BF16 or AMX)" if cpu_has_bf16() else
                    "this CPU has no bf16 instructions (AVX-512 BF16 or AMX), where bf16 runs ~4× slower than fp32")
        return dtype
    return torch.bfloat16


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX, as PyTorch's own CPU probes see them (the instructions oneDNN uses for bf16 GEMMs)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@functools.cache
def _log_choice(dtype: str, why: str) -> None:
    log.info("computing in %s: %s (pass dtype= or --dtype to choose)", dtype.removeprefix("torch."), why)




def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device`: CUDA's count (with what PyTorch holds unused), Linux's MemAvailable for the CPU;
    None where unknown."""
    if device.type == "cuda":
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + unused
    if device.type == "cpu" and os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
