"""The fuzzing harness: mutations of the files flux reads, as hypothesis strategies, and the outcome every case must have.

The contract (docs/hardening.md): whatever a file holds, a loader either returns a correct result or raises
`CheckpointError` with a message that names the file (or the folder holding it). Never another exception from
deep inside, never a hang, never an allocation of a size the file merely declares.

Mutations start from real files the tests build (the tiny snapshot of tests/conftest.py) and edit them at
three levels: the JSON document (set a field to an odd value, drop or add one, replace the whole), the raw
bytes (truncate, overwrite, insert, invalid UTF-8, deep nesting, 5000-digit numbers), and for safetensors
files the header's own fields (dtype, shape, data_offsets, the 8-byte header length, the data).

Run length: `FLUX_FUZZ_EXAMPLES=N` runs every fuzz test N times with fresh random cases and the example
database; unset, each runs its own small, derandomized CI count, the same cases every time.
"""

import contextlib
import copy
import faulthandler
import json
import os
import re
import resource
import shutil
import signal
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from flux.weights.checkpoint import CheckpointError

LONG_RUN = os.environ.get("FLUX_FUZZ_EXAMPLES")
CASES = {"count": 0}  # cases run this session, reported by conftest.py


def fuzz_settings(ci_examples: int) -> settings:
    """`ci_examples` derandomized cases in CI; FLUX_FUZZ_EXAMPLES random ones (and the database) for a long run."""
    # No shrinking: a case prints as its list of edits already, and shrinking a 72 MB file takes minutes.
    common = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True,
                  phases=[Phase.explicit, Phase.reuse, Phase.generate])
    if LONG_RUN:
        return settings(max_examples=int(LONG_RUN), **common)
    return settings(max_examples=ci_examples, derandomize=True, database=None, **common)


# --------------------------------------------------------------------------------------------------
# The outcome
# --------------------------------------------------------------------------------------------------

SECONDS = 30  # per case; the largest file is 72 MB, read in well under a second
EXTRA_BYTES = 1 << 30  # peak memory above the start of the case; a correct load maps at most ~150 MB


class FuzzTimeout(AssertionError):
    pass


@contextlib.contextmanager
def bounded(seconds: float = SECONDS, extra_bytes: int = EXTRA_BYTES):
    """Fails the case on a hang (a Python-level timer, and a hard exit with tracebacks at twice the time for a
    hang inside C code) or on an allocation of more than `extra_bytes`: the process's data segment is capped
    for the case, so a huge allocation raises MemoryError instead of drawing the machine's OOM killer, and the
    peak resident memory is checked afterwards."""
    def timeout(signum, frame):
        raise FuzzTimeout(f"the case ran longer than {seconds} s: a hang")

    track_memory = os.path.exists("/proc/self/clear_refs")
    if track_memory:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current size
        start = _status_bytes("VmRSS")
        soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        cap = _status_bytes("VmData") + 2 * extra_bytes
        resource.setrlimit(resource.RLIMIT_DATA, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    previous = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(2 * seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if track_memory:
            resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    if track_memory:
        grown = _status_bytes("VmHWM") - start
        assert grown < extra_bytes, f"peak memory grew by {grown / 2**20:.0f} MiB in one case"


def _status_bytes(key: str) -> int:
    line = next(line for line in open("/proc/self/status") if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def outcome(call, *, names):
    """Runs `call()` under `bounded`: returns its result, or None after a `CheckpointError` whose message
    names one of `names` (paths: the mutated file, or the folder holding it). Any other exception fails."""
    CASES["count"] += 1
    try:
        with bounded():
            return call()
    except CheckpointError as error:
        message = str(error)
        assert any(str(name) in message for name in names), f"the error names none of {names}: {message}"
        return None


@contextlib.contextmanager
def case_folder(parent: Path):
    """A fresh folder for one case, removed afterwards (the seeds are up to 72 MB)."""
    folder = Path(tempfile.mkdtemp(dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Values and edits
# --------------------------------------------------------------------------------------------------

class Mutant(bytes):
    """A mutated file's contents. Its repr lists the edits, not the bytes: hypothesis prints every draw of a
    failing case, and the seeds are megabytes."""

    edits: tuple[str, ...] = ()

    def __repr__(self):
        return f"<{len(self)} bytes: {'; '.join(self.edits) or 'unchanged'}>"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


INTERESTING_INTS = [-(2**63) - 1, -(2**63), -1, 0, 1, 2, 3, 7, 16, 255, 2**31 - 1, 2**31, 2**32, 2**53 + 1,
                    2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**12, 10**30]
odd_values = st.one_of(
    st.sampled_from(INTERESTING_INTS), st.integers(),
    st.floats(),  # NaN and ±inf too: Python's json writes NaN and Infinity
    st.booleans(), st.none(), st.text(max_size=12), st.sampled_from(["", "\udcff", "..", "/etc/passwd", "a\0b"]),
    st.lists(st.integers(-2, 2**40), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
)


# The editing helpers take hypothesis's `draw` rather than being strategies themselves: a strategy keeps its
# arguments alive for the whole run, and these are megabytes.

def edit_json(draw, document, log: list):
    """The document with one to three edits at random places, each appended to `log`: a value set to an odd
    one, a key dropped or added, an element appended, or the whole document replaced."""
    document = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(document, (dict, list)) or not document or draw(st.integers(0, 19)) == 0:
            document = draw(odd_values)
            log.append(f"document = {_short(document)}")
            continue
        container, where = document, ""
        while True:  # walk down: at each level stop here or go into a child that is itself a container
            keys = list(container) if isinstance(container, dict) else list(range(len(container)))
            key = draw(st.sampled_from(keys))
            child = container[key]
            if isinstance(child, (dict, list)) and child and draw(st.booleans()):
                container, where = child, f"{where}[{key!r}]"
                continue
            break
        action = draw(st.sampled_from(["set", "set", "drop", "add"]))
        if action == "set":
            container[key] = draw(odd_values)
            log.append(f"{where}[{key!r}] = {_short(container[key])}")
        elif action == "drop":
            del container[key]
            log.append(f"del {where}[{key!r}]")
        elif isinstance(container, dict):
            new_key = draw(st.text(max_size=10))
            container[new_key] = draw(odd_values)
            log.append(f"{where}[{new_key!r}] = {_short(container[new_key])}")
        else:
            container.append(draw(odd_values))
            log.append(f"{where}.append({_short(container[-1])})")
    return document


RAW_EDITS = ("none", "none", "truncate", "overwrite", "overwrite", "insert", "not-utf8", "deep", "big-number", "bom")


def edit_bytes(draw, data: bytes, log: list, *, focus: int | None = None, actions=RAW_EDITS):
    """The bytes with a raw edit (appended to `log`), or unchanged: truncated, overwritten, with bytes inserted,
    not UTF-8, nested 100 000 deep, with a 5000-digit number, behind a byte-order mark. `focus` (a length)
    makes most overwrites land in the first `focus` bytes (a header)."""
    action = draw(st.sampled_from(actions))
    if action == "none" or not data and action in ("truncate", "overwrite"):
        return data
    if action == "truncate":
        cut = draw(st.integers(0, len(data) - 1))
        log.append(f"cut to {cut} of {len(data)} bytes")
        return data[:cut]
    if action == "overwrite":
        data = bytearray(data)
        end = min(len(data), focus) if focus and draw(st.integers(0, 3)) else len(data)
        for _ in range(draw(st.integers(1, 8))):
            at, value = draw(st.integers(0, max(end - 1, 0))), draw(st.integers(0, 255))
            data[at] = value
            log.append(f"byte {at} = {value:#04x}")
        return bytes(data)
    if action == "insert":
        at, extra = draw(st.integers(0, len(data))), draw(st.binary(min_size=1, max_size=16))
        log.append(f"insert {extra!r} at {at}")
        return data[:at] + extra + data[at:]
    if action == "not-utf8":
        at = draw(st.integers(0, min(len(data), focus or len(data))))
        log.append(f"insert b'\\xff\\xfe' at {at}")
        return data[:at] + b"\xff\xfe" + data[at:]
    if action == "deep":
        closed = draw(st.booleans())
        log.append("nested 100 000 deep" + (", closed" if closed else ""))
        return b"[" * 100_000 + b"]" * (100_000 if closed else 0)
    if action == "big-number":
        log.append("a 5000-digit number")
        return re.sub(rb"\d+", b"9" * 5000, data, count=1) if re.search(rb"\d", data) else data + b"9" * 5000
    log.append("byte-order mark")
    return b"\xef\xbb\xbf" + data


@st.composite
def mutated_json_file(draw, document) -> Mutant:
    """A JSON file's bytes after edits to its document and, or, its bytes."""
    log = []
    if draw(st.integers(0, 3)):
        document = edit_json(draw, document, log)
    text = json.dumps(document).encode()  # ensure_ascii: lone surrogates written as \udcff escapes
    return _mutant(edit_bytes(draw, text, log), log)


@st.composite
def mutated_bytes(draw, data: bytes) -> Mutant:
    """A file's bytes after raw edits only (for binary files: spiece.model)."""
    log = []
    for _ in range(draw(st.integers(1, 3))):
        data = edit_bytes(draw, data, log, actions=("truncate", "overwrite", "overwrite", "insert"))
    return _mutant(data, log)


def _mutant(data: bytes, log: list) -> Mutant:
    mutant = Mutant(data)
    mutant.edits = tuple(log)
    return mutant


# --------------------------------------------------------------------------------------------------
# safetensors files
# --------------------------------------------------------------------------------------------------

def split_safetensors(blob: bytes) -> tuple[dict, bytes]:
    (size,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + size]), blob[8 + size :]


SAFETENSORS_DTYPES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8", "BOOL",
                      "U16", "U32", "U64", "F8_E8M0", "F4", "C64", "f32", ""]


@st.composite
def mutated_safetensors(draw, blob: bytes) -> Mutant:
    """A safetensors file with edits to its header entries, its JSON, its 8-byte length or its bytes."""
    try:
        header, data = split_safetensors(blob)
    except (struct.error, ValueError, RecursionError):  # a file an earlier edit already broke: raw edits only
        return draw(mutated_bytes(blob))
    if not isinstance(header, dict):
        return draw(mutated_bytes(blob))
    names = sorted(k for k in header if k != "__metadata__")
    log = []
    for _ in range(draw(st.integers(0, 3))):
        edit = draw(st.sampled_from(["dtype", "shape", "offsets", "offsets", "copy", "drop", "rename", "json",
                                     "metadata", "data"]))
        name = draw(st.sampled_from(names)) if names else None
        entry = header.get(name)
        if not isinstance(entry, dict) and edit not in ("json", "metadata", "data"):
            continue
        if edit == "dtype":
            entry["dtype"] = draw(st.one_of(st.sampled_from(SAFETENSORS_DTYPES), odd_values))
            log.append(f"{name!r} dtype = {_short(entry['dtype'])}")
        elif edit == "shape":
            shape = entry.get("shape")
            shape = list(shape) if isinstance(shape, list) else []
            change = draw(st.sampled_from(["append", "drop", "set", "reverse", "odd"]))
            if change == "append":
                shape.append(draw(st.sampled_from(INTERESTING_INTS)))
            elif change == "drop" and shape:
                shape.pop(draw(st.integers(0, len(shape) - 1)))
            elif change == "set" and shape:
                shape[draw(st.integers(0, len(shape) - 1))] = draw(st.one_of(st.sampled_from(INTERESTING_INTS), odd_values))
            elif change == "reverse":
                shape.reverse()
            entry["shape"] = shape if change != "odd" else draw(odd_values)
            log.append(f"{name!r} shape = {_short(entry['shape'])}")
        elif edit == "offsets":
            offsets = entry.get("data_offsets")
            offsets = list(offsets) if isinstance(offsets, list) else [0, 0]
            change = draw(st.sampled_from(["shift", "set", "other", "odd"]))
            if change == "shift":
                delta = draw(st.sampled_from([-4, -1, 1, 2, 4, len(data), 2**40]))
                offsets = [n + delta if type(n) is int else n for n in offsets]
            elif change == "set" and offsets:
                offsets[draw(st.integers(0, len(offsets) - 1))] = draw(st.sampled_from(INTERESTING_INTS))
            elif change == "other":  # another tensor's bytes: an overlap
                other = header.get(draw(st.sampled_from(names)))
                offsets = list(other["data_offsets"]) if isinstance(other, dict) and isinstance(other.get("data_offsets"), list) else offsets
            elif change == "odd":
                offsets = draw(odd_values)
            entry["data_offsets"] = offsets
            log.append(f"{name!r} data_offsets = {_short(offsets)}")
        elif edit == "copy":  # a second name for an entry
            new_name = draw(st.one_of(st.text(max_size=20), st.sampled_from(["__metadata__", "\udcff", name + ".copy"])))
            header[new_name] = copy.deepcopy(entry)
            log.append(f"{name!r} copied to {new_name!r}")
        elif edit == "drop":
            del header[name]
            log.append(f"{name!r} dropped")
        elif edit == "rename":
            new_name = draw(st.text(min_size=1, max_size=20))
            header[new_name] = header.pop(name)
            log.append(f"{name!r} renamed {new_name!r}")
        elif edit == "json":
            header = edit_json(draw, header, log)
            if not isinstance(header, dict):
                break
        elif edit == "metadata":
            header["__metadata__"] = draw(st.one_of(odd_values, st.dictionaries(st.text(max_size=5), st.text(max_size=5))))
            log.append(f"__metadata__ = {_short(header['__metadata__'])}")
        else:  # the tensors' bytes (NaN, inf and garbage are values like any other)
            data = edit_bytes(draw, data, log, actions=("overwrite",))
    text = edit_bytes(draw, json.dumps(header).encode(), log, actions=("none",) * 6 + RAW_EDITS)
    if draw(st.integers(0, 5)) == 0:
        text += b" " * draw(st.integers(1, 9))  # the format allows trailing spaces (alignment padding)
        log.append("header padded with spaces")
    length = len(text)
    if draw(st.integers(0, 5)) == 0:
        length = draw(st.one_of(st.sampled_from([0, 1, max(length - 1, 0), length + 1, len(text) + len(data), 2**31,
                                                 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1)))
        log.append(f"header length = {length}")
    result = struct.pack("<Q", length) + text + data
    result = edit_bytes(draw, result, log, focus=8 + len(text), actions=("none", "none", "none", "truncate", "overwrite", "insert"))
    return _mutant(result, log)


# --------------------------------------------------------------------------------------------------
# GGUF files
# --------------------------------------------------------------------------------------------------

GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
GGUF_TYPE_IDS = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20, 24, 28, 30, 31, 39, 40, 2**31, 2**32 - 1]


def gguf_fields(blob: bytes) -> list[tuple[int, int, str]]:
    """(offset, size, label) of every number in a valid GGUF file's header: the version and counts, each string's
    length, each metadata value type, array item type and count and scalar value, each tensor's n_dims, dims,
    type and offset. Read by the suite itself, so that edits land on fields rather than anywhere."""
    fields, position = [], 4

    def number(size: int, label: str) -> int:
        nonlocal position
        fields.append((position, size, label))
        value = int.from_bytes(blob[position:position + size], "little")
        position += size
        return value

    def string(label: str) -> None:
        nonlocal position
        length = number(8, f"{label} length")  # first: `position += number(...)` would add to the old position
        position += length

    def value(type_id: int, label: str) -> None:
        nonlocal position
        if type_id in GGUF_SCALAR_SIZES:
            number(GGUF_SCALAR_SIZES[type_id], label)
        elif type_id == 8:
            string(label)
        else:  # 9, an array
            item_type, count = number(4, f"{label} item type"), number(8, f"{label} count")
            for index in range(count):
                value(item_type, f"{label}[{index}]")

    number(4, "version")
    tensors, entries = number(8, "tensor count"), number(8, "metadata count")
    for index in range(entries):
        string(f"key {index}")
        value(number(4, f"key {index} type"), f"key {index} value")
    for index in range(tensors):
        string(f"tensor {index} name")
        dims = number(4, f"tensor {index} n_dims")
        for dim in range(dims):
            number(8, f"tensor {index} dim {dim}")
        number(4, f"tensor {index} type")
        number(8, f"tensor {index} offset")
    return fields


@st.composite
def mutated_gguf(draw, blob: bytes) -> Mutant:
    """A GGUF file with edits to its header's numbers (set to odd values, nudged, a type id changed), then
    perhaps raw edits (truncated, overwritten, bytes inserted)."""
    fields, log = gguf_fields(blob), []
    data = bytearray(blob)
    header_end = max(offset + size for offset, size, _ in fields)
    for _ in range(draw(st.integers(0, 4))):
        offset, size, label = draw(st.sampled_from(fields))
        old = int.from_bytes(data[offset:offset + size], "little")
        change = draw(st.sampled_from(["odd", "nudge", "type"] if label.endswith("type") else ["odd", "nudge", "nudge"]))
        if change == "odd":
            new = draw(st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(0, 2**64 - 1)))
        elif change == "nudge":
            new = old + draw(st.sampled_from([-32, -2, -1, 1, 2, 31, 32, 256, 2**32]))
        else:
            new = draw(st.sampled_from(GGUF_TYPE_IDS))
        new %= 1 << (8 * size)
        data[offset:offset + size] = new.to_bytes(size, "little")
        log.append(f"{label} = {new} (was {old})")
    result = edit_bytes(draw, bytes(data), log, focus=header_end, actions=("none", "none", "truncate", "overwrite", "insert"))
    return _mutant(result, log)
