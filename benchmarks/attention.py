"""FLUX's joint attention on the CPU: plain SDPA against what else PyTorch offers.

    python -m benchmarks.attention [--sizes 256 512 1024] [--dtypes float32 bfloat16] [--reps 3]

One attention of the real model (24 heads of 128, 256 text tokens + (size/16)² image tokens, batch 1), timed
in each of these forms, best of `--reps` after a warm-up (compiled forms after their compilation):

  sdpa            `F.scaled_dot_product_attention`, PyTorch's default CPU kernel (flash-attention style)
  sdpa-math       the same call restricted to the math backend (QKᵀ, softmax, PV as separate operations)
  bmm-chunked     QKᵀ and PV as batched matrix products over chunks of heads, softmax in between: the matmul
                  library's speed on the two products at the cost of writing the scores to memory
  flex            `torch.nn.attention.flex_attention` compiled with `torch.compile` (no mask, no score_mod)
  sdpa+rope       our `flux.modules.transformer.attention` (rotary embedding of q and k in fp32, then SDPA), eager
  sdpa+rope compiled   the same function under `torch.compile`, which may fuse the rotary arithmetic

Reports wall and process CPU time (the steadier on a shared machine) and GFLOP/s counting 4·H·L²·D per attention (QKᵀ and PV), as the roofline in benchmarks/compare.py
does, and each form's largest deviation from plain SDPA.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

from flux.modules.transformer import attention, rope_table
from flux.pipelines.sampling import image_ids, text_ids

HEADS, HEAD_DIM, TEXT_TOKENS = 24, 128, 256


def bmm_chunked(q, k, v, heads_per_chunk=4):
    """Attention as two batched matrix products per chunk of heads, the softmax in fp32 between them."""
    out = torch.empty_like(q)
    scale = q.shape[-1] ** -0.5
    for start in range(0, q.shape[1], heads_per_chunk):
        part = slice(start, start + heads_per_chunk)
        scores = torch.matmul(q[:, part] * scale, k[:, part].transpose(-1, -2))
        out[:, part] = torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v[:, part])
    return out


def forms():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    def sdpa_math(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)

    flex = torch.compile(flex_attention, dynamic=False)
    compiled_attention = torch.compile(attention, dynamic=False)
    return {
        "sdpa": lambda q, k, v, rope: F.scaled_dot_product_attention(q, k, v),
        "sdpa-math": lambda q, k, v, rope: sdpa_math(q, k, v),
        "bmm-chunked": lambda q, k, v, rope: bmm_chunked(q, k, v),
        "flex": lambda q, k, v, rope: flex(q, k, v),
        "sdpa+rope": lambda q, k, v, rope: attention(q, k, v, rope, None),
        "sdpa+rope compiled": lambda q, k, v, rope: compiled_attention(q, k, v, rope, None),
    }


def measure(size: int, dtype: torch.dtype, reps: int, only: list[str] | None) -> list[dict]:
    length = TEXT_TOKENS + (size // 16) ** 2
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM, dtype=dtype) for _ in range(3))
    ids = torch.cat((text_ids(1, TEXT_TOKENS), image_ids(1, size, size)), dim=1)  # text first, as in the model
    rope = rope_table(ids, (16, 56, 56), 10_000)
    flops = 4 * HEADS * length * length * HEAD_DIM
    rows, reference = [], None
    with torch.inference_mode():
        for name, function in forms().items():
            if only and name not in only:
                continue
            try:
                start = time.perf_counter()
                out = function(q, k, v, rope)  # the warm-up; includes compilation for the compiled forms
                first = time.perf_counter() - start
                times, cpu_times = [], []
                for _ in range(reps):
                    start, start_cpu = time.perf_counter(), time.process_time()
                    out = function(q, k, v, rope)
                    times.append(time.perf_counter() - start)
                    cpu_times.append(time.process_time() - start_cpu)
            except Exception as error:  # a form this build cannot run is reported, not fatal
                rows.append({"form": name, "size": size, "dtype": str(dtype), "error": f"{type(error).__name__}: {error}"[:300]})
                continue
            out = rearrange(out, "B H L D -> B L (H D)") if out.ndim == 4 else out
            if name == "sdpa":
                reference = out.float()
            error = (out.float() - reference).abs().max().item() if reference is not None and "rope" not in name else None
            rows.append({"form": name, "size": size, "tokens": length, "dtype": str(dtype).removeprefix("torch."),
                         "seconds": min(times), "cpu_seconds": min(cpu_times), "first_call_s": first,
                         "gflops": flops / min(times) / 1e9,
                         "max_abs_diff_vs_sdpa": error})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--forms", nargs="*", help="only these forms")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "attention.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"FLUX joint attention, 24 heads × 128, batch 1, {args.threads} threads, torch {torch.__version__}\n")
    print("| dtype | size | tokens | form | ms | GFLOP/s | vs sdpa | CPU ms | vs sdpa (CPU) | first call (s) | max |Δ| vs sdpa |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for dtype in args.dtypes:
        for size in args.sizes:
            case = measure(size, getattr(torch, dtype), args.reps, args.forms)
            rows += case
            base = next((r for r in case if r["form"] == "sdpa" and "seconds" in r), None)
            for r in case:
                if "error" in r:
                    print(f"| {dtype} | {size}² | | {r['form']} | failed: {r['error'][:80]} | | | | | | |", flush=True)
                    continue
                diff = "" if r["max_abs_diff_vs_sdpa"] is None else f"{r['max_abs_diff_vs_sdpa']:.1e}"
                print(f"| {dtype} | {size}² | {r['tokens']} | {r['form']} | {r['seconds'] * 1e3:.0f} | {r['gflops']:.0f} | "
                      f"{base['seconds'] / r['seconds'] if base else float('nan'):.2f}× | {r['cpu_seconds'] * 1e3:.0f} | "
                      f"{base['cpu_seconds'] / r['cpu_seconds'] if base else float('nan'):.2f}× | {r['first_call_s']:.1f} | {diff} |",
                      flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
