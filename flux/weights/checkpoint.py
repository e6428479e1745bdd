"""Reading checkpoints: safetensors files and sharded indexes, and assigning them to modules built on `meta`.

Everything the library reads from disk passes through here, so this is where hostile or broken files are
stopped. The safetensors format (https://github.com/huggingface/safetensors) is an 8-byte little-endian
header length, a JSON header `{name: {dtype, shape, data_offsets}}` and the raw bytes. We parse it ourselves
rather than through `safetensors.safe_open` for two reasons:
  - every failure becomes a `CheckpointError` that names the file and the tensor, checked before any
    allocation (a header may declare sizes the file does not hold);
  - tensors are views of a private memory map, so loading a bf16 file into a bf16 model copies nothing:
    the weights are paged in from the file as they are used, and the peak memory is the file's size.
Nothing is ever unpickled.
"""

import json
import math
import mmap
import os
import struct
from pathlib import Path

import torch
from torch import nn

# The safetensors dtype names.
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20  # the reference implementation's own limit


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be loaded. The message names the file and says what to do."""


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of one `.safetensors` file, memory-mapped: nothing is read until a tensor is used."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: is not a file (expected a .safetensors file)")
    file_size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {file_size} bytes); re-download it")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(MAX_HEADER_BYTES, file_size - 8):
            raise CheckpointError(
                f"{path}: not a safetensors file, or truncated (declares a {header_size}-byte header in a "
                f"{file_size}-byte file); re-download it"
            )
        try:
            header = json.loads(file.read(header_size).decode("utf-8"))
            # Python's json also takes NaN and lone surrogates ("\ud800" escapes); JSON, and the reference, do not.
            json.dumps(header, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except (ValueError, RecursionError) as error:  # not UTF-8, not JSON, a 5000-digit number, nested too deep
            raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON: {error})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
        metadata = header.pop("__metadata__", {})
        if not (isinstance(metadata, dict) and all(isinstance(value, str) for value in metadata.values())):
            raise CheckpointError(f"{path}: malformed __metadata__ {metadata!r:.80} (the format allows a map of strings to "
                                  "strings); the file is corrupt")
        data_start = 8 + header_size
        data_size = file_size - data_start
        entries = {name: _check_entry(path, name, entry, data_size) for name, entry in header.items()}
        _check_layout(path, entries, data_size)
        # A private (copy-on-write) map: tensors may be written in place (training) without touching the file.
        buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) if file_size else None
    return {name: _tensor_view(buffer, data_start + begin, data_start + end, dtype, shape)
            for name, (dtype, shape, begin, end) in entries.items()}


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object (a config, an index, a tokenizer file); anything else is a CheckpointError."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # ValueError: not UTF-8, not JSON, a 5000-digit number
        raise CheckpointError(f"{path}: not valid JSON ({error}); re-download it") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(content).__name__}")
    return content


def _check_entry(path: Path, name: str, entry, data_size: int):
    """Validates one header entry before anything is allocated for it."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: malformed header entry {entry!r:.80}")
    dtype = DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
    if dtype is None:
        raise CheckpointError(f"{where}: unsupported dtype {entry.get('dtype')!r:.80} (known: {', '.join(DTYPES)})")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
        raise CheckpointError(f"{where}: malformed shape {shape!r:.80}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
        raise CheckpointError(f"{where}: malformed data_offsets {offsets!r:.80}")
    begin, end = offsets
    # An empty tensor stores no bytes, so nothing else bounds its other dimensions; torch needs them to fit int64.
    if math.prod(max(n, 1) for n in shape) >= 2**63:
        raise CheckpointError(f"{where}: shape {shape} is too large for any tensor; the file is corrupt")
    if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(
            f"{where}: its bytes [{begin}, {end}) do not fit shape {shape} of {entry['dtype']} in the file's "
            f"{data_size} data bytes; the file is truncated or corrupt, re-download it"
        )
    return dtype, shape, begin, end


def _check_layout(path: Path, entries: dict, data_size: int) -> None:
    """As the reference implementation requires: the tensors' bytes follow one another with no gap and no overlap
    and fill the data exactly, so no byte belongs to two tensors or hides anything else (a polyglot file)."""
    position = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != position:
            raise CheckpointError(f"{path}: tensor {name!r} starts at data byte {begin}, expected {position} (tensors "
                                  "must follow one another, with no gap or overlap); the file is corrupt, re-download it")
        position = end
    if position != data_size:
        raise CheckpointError(f"{path}: its tensors fill {position} of its {data_size} data bytes; the file is corrupt, "
                              "re-download it")


def _tensor_view(buffer, begin: int, end: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if end == begin:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(buffer, dtype=torch.uint8, count=end - begin, offset=begin)
    if begin % dtype.itemsize:
        raw = raw.clone()  # viewing bytes as a wider dtype needs aligned storage; rare, files align their data
    return raw.view(dtype).reshape(shape)


def read_sharded(index_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors listed by a Hugging Face `*.safetensors.index.json`, read from its shards."""
    index_path = Path(index_path)
    if not index_path.is_file():
        raise CheckpointError(f"{index_path}: index file not found")
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, RecursionError, KeyError, TypeError) as error:  # ValueError: not UTF-8, not JSON
        raise CheckpointError(f"{index_path}: not a valid index (expected JSON with a 'weight_map'): {error!r:.200}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
    folder = index_path.parent
    shards = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = folder / shard_name
        # An index downloaded from anywhere names files beside it, nothing else. Checked on the name, not on the
        # resolved path: in the Hugging Face cache every file is a symlink into the cache's blobs/ folder.
        if Path(shard_name).name != shard_name or shard_name in ("", "..") or "\0" in shard_name:
            raise CheckpointError(f"{index_path}: shard {shard_name!r} is outside the index's folder; refusing to read it")
        if not shard.is_file():
            raise CheckpointError(f"{index_path}: shard {shard_name!r} is missing from {folder}; download it again")
        shards[shard_name] = read_safetensors(shard)
    tensors = {}
    for name, shard_name in weight_map.items():
        if name not in shards[shard_name]:
            raise CheckpointError(f"{index_path}: tensor {name!r} is listed in shard {shard_name!r} but not stored there")
        tensors[name] = shards[shard_name][name]
    return tensors


def read_weights(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    """A folder's `{stem}.safetensors`, or the shards of its `{stem}.safetensors.index.json`."""
    index, single = folder / f"{stem}.safetensors.index.json", folder / f"{stem}.safetensors"
    if index.is_file():
        return read_sharded(index)
    if single.is_file():
        return read_safetensors(single)
    raise CheckpointError(f"{folder}: holds neither {single.name} nor {index.name}")


def load_into(
    module: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str | os.PathLike,
    device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
) -> nn.Module:
    """Assigns `state_dict` to `module` (built on `meta`), after checking every name and shape against it.

    Floating-point tensors are converted to `dtype` (fp8, fp16, fp32 files alike) and moved to `device` one
    at a time, so no second copy of the model is ever held. `source` names the file in error messages.
    """
    expected = module.state_dict()
    missing = [name for name in expected if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected]
    if missing:
        raise CheckpointError(
            f"{source}: missing {len(missing)} tensor(s) the model needs: {_names(missing)}. "
            "Is this the right file for this model, and complete?"
        )
    if unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} unexpected tensor(s): {_names(unexpected)}. "
            "The file holds a different model or layout than the one being built."
        )
    for name, tensor in state_dict.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(expected[name].shape)}; the file does not match the model's configuration"
            )
    converted = {}
    for name, tensor in state_dict.items():
        target = dtype if dtype is not None and tensor.is_floating_point() else expected[name].dtype
        if not tensor.is_floating_point() and expected[name].is_floating_point():
            raise CheckpointError(f"{source}: tensor {name!r} is stored as {tensor.dtype}, expected floating point")
        converted[name] = tensor.to(device=device, dtype=target)
    module.load_state_dict(converted, strict=True, assign=True)
    leftover = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover:  # a module with non-persistent buffers: a bug in the model file, not in the checkpoint
        raise RuntimeError(f"{type(module).__name__} kept meta tensors after loading: {_names(leftover)}")
    return module


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def write_safetensors(path: str | os.PathLike, layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
                      tensors, *, metadata: dict[str, str] | None = None) -> None:
    """Writes a `.safetensors` file one tensor at a time: `layout` {name: (shape, dtype)} in file order gives the
    header, `tensors` yields (name, tensor) pairs in that order and may make each one as it is asked for.

    `safetensors.torch.save_file` copies every tensor into one bytes object first, twice the model in memory;
    here the peak is one tensor. The file appears under its name only once complete (written beside it, then
    renamed), so a half-written file is never mistaken for a checkpoint. Byte order: the machine's, which is
    little-endian, as the format requires, on every platform PyTorch runs on.
    """
    path = Path(path)
    dtype_names = {dtype: name for name, dtype in DTYPES.items()}
    header, position = {}, 0
    for name, (shape, dtype) in layout.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": dtype_names[dtype], "shape": list(shape), "data_offsets": [position, position + size]}
        position += size
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data then starts 8-byte aligned, as the reference writes it
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as file:
            file.write(struct.pack("<Q", len(encoded)) + encoded)
            expected = iter(layout.items())
            for name, tensor in tensors:
                want = next(expected, None)
                if want is None or (name, tuple(tensor.shape), tensor.dtype) != (want[0], tuple(want[1][0]), want[1][1]):
                    raise ValueError(f"{path}: got tensor {name!r} {tuple(tensor.shape)} {tensor.dtype}, expected the "
                                     f"layout's next, {want[0] if want else 'none'!r} {want[1] if want else ''}")
                flat = tensor.detach().to("cpu").contiguous().reshape(-1)
                file.write(flat.view(torch.uint8).numpy().data)  # the tensor's own bytes: no copy
            missing = [name for name, _ in expected]
            if missing:
                raise ValueError(f"{path}: {len(missing)} tensor(s) of the layout were never given: {_names(missing)}")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
