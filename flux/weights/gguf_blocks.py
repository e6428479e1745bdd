"""The GGUF tensor types as torch: what each block of bytes holds, and how it becomes weights.

GGUF (the file format of llama.cpp's ggml) stores a quantized matrix row by row, each row cut into blocks of
32 weights (the "legacy" types Q8_0 ... Q4_0) or 256 (the K-quants Q6_K ... Q2_K). A block is a few fp16
scales followed by packed small integers; a weight is scale · q (+ min). The layouts below are ggml's
(`ggml-common.h` and `dequantize_row_*` in `ggml-quants.c`; gguf-py's `quants.py` spells the same in numpy),
restated from those definitions. tests/test_gguf.py compares every type with `gguf.quants.dequantize`.

Every function takes the raw blocks of any number of rows as a (N, bytes_per_block) uint8 tensor and returns
(N, weights_per_block) fp32, with tensor operations only: no Python loop over blocks, so it runs as a handful
of kernels on a CPU or GPU and traces under `torch.compile`. Bits are picked with shifts and masks on uint8;
integers become fp32 only at the end, where they are exact (at most 8 bits).

Axis glossary: N blocks; inside a K-quant block S sub-blocks (16 of 16 weights or 8 of 32), H halves of 128
weights, K the 4 bit-planes of a byte's 2-bit fields, L the position within a 32-weight run.
"""

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor


@dataclass(frozen=True)
class BlockType:
    """A GGUF tensor type: its id in the file, weights per block and bytes per block."""

    name: str
    id: int
    block: int
    bytes: int

    @property
    def quantized(self) -> bool:
        return self.block > 1


# The ids are ggml's `enum ggml_type`; sizes as in its type traits (block_q4_0 is 2 + 16 bytes for 32 weights).
TYPES = {t.name: t for t in [
    BlockType("F32", 0, 1, 4), BlockType("F16", 1, 1, 2), BlockType("BF16", 30, 1, 2),
    BlockType("Q8_0", 8, 32, 34), BlockType("Q5_1", 7, 32, 24), BlockType("Q5_0", 6, 32, 22),
    BlockType("Q4_1", 3, 32, 20), BlockType("Q4_0", 2, 32, 18),
    BlockType("Q6_K", 14, 256, 210), BlockType("Q5_K", 13, 256, 176), BlockType("Q4_K", 12, 256, 144),
    BlockType("Q3_K", 11, 256, 110), BlockType("Q2_K", 10, 256, 84),
]}
BY_ID = {t.id: t for t in TYPES.values()}
# The other ggml types, named in the error a file holding one gets (importance-matrix quants, integers, ...).
OTHER_TYPES = {9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
               21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
               29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}


def dequantize(blocks: Tensor, kind: BlockType) -> Tensor:
    """(N, kind.bytes) uint8 -> (N, kind.block) fp32 weights."""
    if blocks.dtype != torch.uint8 or blocks.ndim != 2 or blocks.shape[1] != kind.bytes:
        raise ValueError(f"{kind.name} blocks are (N, {kind.bytes}) uint8, got {blocks.dtype} {tuple(blocks.shape)}")
    return DEQUANTIZERS[kind.name](blocks)


# --------------------------------------------------------------------------------------------------
# Pieces of a block
# --------------------------------------------------------------------------------------------------

def _f16(blocks: Tensor, start: int) -> Tensor:
    """The little-endian fp16 at byte `start` of each block, as fp32: (N, 1)."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _shifts(*values: int, like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=like.device)


def _nibbles(packed: Tensor) -> Tensor:
    """(N, 16) bytes -> (N, 32): the low nibbles are weights 0..15, the high ones 16..31 (ggml's order for
    the 32-weight types, not byte-interleaved)."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=1)


def _bits(packed: Tensor) -> Tensor:
    """(N, 4) bytes, one little-endian uint32 -> (N, 32): bit j of it for weight j."""
    bits = (packed[:, :, None] >> _shifts(*range(8), like=packed)) & 1  # (N, 4 bytes, 8 bits)
    return rearrange(bits, "N B I -> N (B I)")


# --------------------------------------------------------------------------------------------------
# 32-weight blocks: an fp16 scale d (and for the _1 types an fp16 min m), then the integers
# --------------------------------------------------------------------------------------------------

def _q8_0(blocks: Tensor) -> Tensor:
    # d, then 32 signed bytes: w = d · q.
    return _f16(blocks, 0) * blocks[:, 2:].view(torch.int8).float()


def _q4_0(blocks: Tensor) -> Tensor:
    # d, then 16 bytes of 4-bit q stored with an offset of 8: w = d · (q - 8).
    return _f16(blocks, 0) * (_nibbles(blocks[:, 2:18]).float() - 8)


def _q4_1(blocks: Tensor) -> Tensor:
    # d, m, then 16 bytes of unsigned 4-bit q: w = d · q + m.
    return _f16(blocks, 0) * _nibbles(blocks[:, 4:20]).float() + _f16(blocks, 2)


def _q5_0(blocks: Tensor) -> Tensor:
    # d, the 32 fifth bits (one uint32), then the low nibbles as in Q4_0; offset 16: w = d · (q - 16).
    q = _nibbles(blocks[:, 6:22]) | (_bits(blocks[:, 2:6]) << 4)
    return _f16(blocks, 0) * (q.float() - 16)


def _q5_1(blocks: Tensor) -> Tensor:
    # d, m, the fifth bits, the low nibbles: w = d · q + m.
    q = _nibbles(blocks[:, 8:24]) | (_bits(blocks[:, 4:8]) << 4)
    return _f16(blocks, 0) * q.float() + _f16(blocks, 2)


# --------------------------------------------------------------------------------------------------
# 256-weight blocks (K-quants): a super-block scale d (and min dmin) times small per-sub-block scales
# --------------------------------------------------------------------------------------------------
# The 2-bit fields of Q2_K, Q3_K and Q6_K are laid out in two halves of 128 weights; within a half, byte L of a
# 32-byte run holds weight L of each of the four 32-weight runs, in bits (0-1, 2-3, 4-5, 6-7).

def _two_bit_planes(packed: Tensor) -> Tensor:
    """(N, 64) bytes -> (N, 256) 2-bit values in weight order."""
    runs = rearrange(packed, "N (H L) -> N H 1 L", H=2)
    planes = (runs >> _shifts(0, 2, 4, 6, like=packed)[:, None]) & 3  # (N, H, K, L)
    return rearrange(planes, "N H K L -> N (H K L)")


def _q2_k(blocks: Tensor) -> Tensor:
    # 16 bytes of 4-bit (scale, min) per 16 weights, 64 bytes of 2-bit q, d, dmin: w = d·sc·q - dmin·mn.
    scales, q = blocks[:, :16], _two_bit_planes(blocks[:, 16:80])
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    q = rearrange(q, "N (S W) -> N S W", S=16).float()
    out = (d * (scales & 0x0F).float())[..., None] * q - (dmin * (scales >> 4).float())[..., None]
    return rearrange(out, "N S W -> N (S W)")


def _q3_k(blocks: Tensor) -> Tensor:
    # 32 bytes of third bits, 64 bytes of low 2 bits, 12 bytes of 16 6-bit signed scales, d.
    high_mask, low, packed_scales, d = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108], _f16(blocks, 108)
    # The third bit of weight (H, K, L) is bit 4H + K of high_mask[L]; q = low + 4·bit - 4, in -4..3.
    planes = (high_mask[:, None, :] >> _shifts(*range(8), like=blocks)[:, None]) & 1  # (N, H·K, L)
    q = _two_bit_planes(low).float() + 4 * rearrange(planes, "N HK L -> N (HK L)").float() - 4
    # Scales: the low 4 bits of scale i are nibble i // 8 of byte i % 8; the high 2 bits are bits 2·(i // 4)
    # of byte 8 + i % 4. Stored with an offset of 32.
    low4 = torch.cat([packed_scales[:, :8] & 0x0F, packed_scales[:, :8] >> 4], dim=1)  # (N, 16)
    high2 = (packed_scales[:, None, 8:12] >> _shifts(0, 2, 4, 6, like=blocks)[:, None]) & 3  # (N, i // 4, i % 4)
    scales = (low4 | (rearrange(high2, "N A B -> N (A B)") << 4)).float() - 32
    out = (d * scales)[..., None] * rearrange(q, "N (S W) -> N S W", S=16)
    return rearrange(out, "N S W -> N (S W)")


def _scales_and_mins(packed: Tensor) -> tuple[Tensor, Tensor]:
    """The 12 bytes of Q4_K and Q5_K -> 8 6-bit scales and 8 6-bit mins, (N, 8) each. Sub-blocks 0-3 have
    theirs in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 in the nibbles of bytes
    8-11, topped with the 2 spare high bits of bytes 0-3 (scales) and 4-7 (mins)."""
    first, second, third = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([first & 63, (third & 0x0F) | ((first >> 6) << 4)], dim=1)
    mins = torch.cat([second & 63, (third >> 4) | ((second >> 6) << 4)], dim=1)
    return scales.float(), mins.float()


def _k_nibbles(packed: Tensor) -> Tensor:
    """(N, 128) bytes -> (N, 8, 32): four 32-byte runs; sub-block 2c takes run c's low nibbles, 2c + 1 its high."""
    runs = rearrange(packed, "N (C L) -> N C 1 L", C=4)
    return rearrange((runs >> _shifts(0, 4, like=packed)[:, None]) & 0x0F, "N C T L -> N (C T) L")


def _q4_k(blocks: Tensor) -> Tensor:
    # d, dmin, the 6-bit scales and mins of 8 sub-blocks of 32, 128 bytes of nibbles: w = d·sc·q - dmin·m.
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scales, mins = _scales_and_mins(blocks[:, 4:16])
    out = (d * scales)[..., None] * _k_nibbles(blocks[:, 16:144]).float() - (dmin * mins)[..., None]
    return rearrange(out, "N S W -> N (S W)")


def _q5_k(blocks: Tensor) -> Tensor:
    # As Q4_K, with a fifth bit per weight: for sub-block s, bit s of high[L] (32 bytes before the nibbles).
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scales, mins = _scales_and_mins(blocks[:, 4:16])
    fifth = (blocks[:, None, 16:48] >> _shifts(*range(8), like=blocks)[:, None]) & 1  # (N, S, L)
    q = _k_nibbles(blocks[:, 48:176]) | (fifth << 4)
    out = (d * scales)[..., None] * q.float() - (dmin * mins)[..., None]
    return rearrange(out, "N S W -> N (S W)")


def _q6_k(blocks: Tensor) -> Tensor:
    # 128 bytes of low nibbles, 64 bytes of high 2 bits, 16 signed 8-bit scales, d; offset 32: w = d·sc·(q - 32).
    # Per half H: weights of runs K = 0, 1 are the low nibbles of bytes 0..31 and 32..63, runs 2, 3 their high
    # nibbles; the high 2 bits of weight (H, K, L) are bits 2K of high[H, L].
    low = rearrange(blocks[:, :128], "N (H T L) -> N H T L", H=2, T=2)
    low = torch.cat([low & 0x0F, low >> 4], dim=2)  # (N, H, K, L)
    high = (rearrange(blocks[:, 128:192], "N (H L) -> N H 1 L", H=2) >> _shifts(0, 2, 4, 6, like=blocks)[:, None]) & 3
    q = rearrange(low | (high << 4), "N H K L -> N (H K L)").float() - 32
    scales, d = blocks[:, 192:208].view(torch.int8).float(), _f16(blocks, 208)
    out = (d * scales)[..., None] * rearrange(q, "N (S W) -> N S W", S=16)
    return rearrange(out, "N S W -> N (S W)")


DEQUANTIZERS = {"Q8_0": _q8_0, "Q5_1": _q5_1, "Q5_0": _q5_0, "Q4_1": _q4_1, "Q4_0": _q4_0,
                "Q6_K": _q6_k, "Q5_K": _q5_k, "Q4_K": _q4_k, "Q3_K": _q3_k, "Q2_K": _q2_k}
