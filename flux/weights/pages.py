"""Giving the pages of memory-mapped weights back to the page cache: `release_pages(tensors)`.

Weights loaded in their stored dtype are views of a private memory map of their file
(flux/weights/checkpoint.py). Loading reads nothing; a page becomes resident in the process when a forward
first reads it, and then stays mapped, counted in the process's resident memory (RSS), for as long as the map
lives: after one step, the whole transformer. The same bytes sit in the kernel's page cache either way (the
file was read); what the process holds on to is its mapping of them. `release_pages` drops that mapping for
the pages of some tensors (madvise MADV_DONTNEED):

- the process's RSS falls by their size at once;
- the page cache keeps them while memory is free, so the next read maps them again without disk I/O
  (minor page faults: about 3 % of a real-width step, benchmarks/README.md);
- under memory pressure the kernel can drop them from the cache without first unmapping them from us,
  and read them from the file again when needed.

The pipeline's `release_pages=True` (flux/pipelines/pipeline.py) calls it after each transformer block has run,
so the process holds about one block of the transformer at a time; `quantize_int8` calls it on each weight it
has replaced, whose pages its reading made resident.

Safety, the one thing to know: MADV_DONTNEED on a private file map also discards the process's own copies of
pages it wrote (copy-on-write), which would silently revert the write to the file's bytes. A tensor written in
place (training, an in-place merge, `load_state_dict` into mapped weights) must keep those pages, so each
page's state is read from /proc/self/pagemap first and only runs of pages that are still the file's (or not
resident at all) are released. The two partial pages at a tensor's ends may hold a neighbour's bytes and are
always kept. Tensors that are not in a file map (ordinary memory, other devices) are left alone.

Linux only: elsewhere nothing is released, and `pages_supported()` says so (the weights stay mapped and right).
"""

import ctypes
import functools
import os
import sys

import numpy as np
import torch

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MADV_DONTNEED = 4  # <sys/mman.h> on Linux
# /proc/self/pagemap: one 64-bit entry per virtual page (Documentation/admin-guide/mm/pagemap.rst).
PRESENT, SWAPPED, FILE_PAGE = 1 << 63, 1 << 62, 1 << 61


def pages_supported() -> bool:
    """Whether this system can release mapped pages (Linux with /proc/self/pagemap)."""
    return sys.platform.startswith("linux") and os.path.exists("/proc/self/pagemap")


def release_pages(tensors) -> int:
    """Drops this process's mapping of the pages of `tensors` (an iterable; a module's parameters and buffers,
    say) that lie in file maps and hold nothing written; returns the bytes that were resident and are now not."""
    if not pages_supported():
        return 0
    ranges = _mapped_page_ranges(tensors)
    if not ranges:
        return 0
    released = 0
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        for start, end in ranges:
            pagemap.seek(start // PAGE * 8)
            entries = np.frombuffer(pagemap.read((end - start) // PAGE * 8), dtype=np.uint64)
            # Written by us: resident (or swapped) and no longer the file's page. Everything else may go.
            written = ((entries & np.uint64(PRESENT | SWAPPED)) != 0) & ((entries & np.uint64(FILE_PAGE)) == 0)
            released += int(((entries & np.uint64(PRESENT)) != 0).sum() - written.sum()) * PAGE
            for first, last in _runs(~written):
                _madvise(start + first * PAGE, (last - first) * PAGE)
    return released


def resident_bytes(tensors) -> int:
    """The bytes of the whole pages inside `tensors`' file-mapped storages that are resident in this process now."""
    if not pages_supported():
        return 0
    total = 0
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        for start, end in _mapped_page_ranges(tensors):
            pagemap.seek(start // PAGE * 8)
            entries = np.frombuffer(pagemap.read((end - start) // PAGE * 8), dtype=np.uint64)
            total += int(((entries & np.uint64(PRESENT)) != 0).sum()) * PAGE
    return total


def _mapped_page_ranges(tensors) -> list[tuple[int, int]]:
    """The whole pages inside the storages of `tensors` that lie in file-backed maps, merged, sorted."""
    maps = _file_maps()
    ranges, seen = [], set()
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.layout != torch.strided:
            continue
        storage = tensor.untyped_storage()
        begin, size = storage.data_ptr(), storage.nbytes()
        if begin in seen or size < 2 * PAGE:
            continue
        seen.add(begin)
        if not any(low <= begin and begin + size <= high for low, high in maps):
            continue
        first, last = -(-begin // PAGE) * PAGE, (begin + size) // PAGE * PAGE  # inward: the ends are shared
        if last > first:
            ranges.append((first, last))
    ranges.sort()
    merged: list[tuple[int, int]] = []
    for first, last in ranges:
        if merged and first <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(last, merged[-1][1]))
        else:
            merged.append((first, last))
    return merged


def _file_maps() -> list[tuple[int, int]]:
    """(start, end) of this process's file-backed maps, from /proc/self/maps (a line: range perms offset dev inode path)."""
    maps = []
    with open("/proc/self/maps") as lines:
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
                low, high = fields[0].split("-")
                maps.append((int(low, 16), int(high, 16)))
    return maps


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[first, last) index ranges where `mask` is True."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.view(np.int8), [0]))))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def _madvise(address: int, length: int) -> None:
    if _libc().madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), MADV_DONTNEED) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"madvise(MADV_DONTNEED) on {length} bytes at {address:#x}: {os.strerror(error)}")


@functools.cache
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc
