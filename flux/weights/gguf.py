"""GGUF transformers kept quantized: `read_gguf`, `GgufLinear`, `load_gguf_flow_model`.

The community runs FLUX.1 from GGUF files (city96's FLUX.1-schnell-gguf and FLUX.1-dev-gguf, written by
ComfyUI-GGUF's tools or stable-diffusion.cpp): Q4_0 takes 6.8 GB against 23.8 GB in bf16. Their conventions,
which `load_gguf_flow_model` reads and flux/weights/gguf_save.py writes:
- `general.architecture` is "flux"; stable-diffusion.cpp writes none, and is recognised by the tensor names;
- the tensor names are Black Forest Labs' (our module names), possibly under a prefix such as
  `model.diffusion_model.`, as in single-file bundles;
- a tensor's dimensions are listed innermost first (ggml's ne[0] is the row length), the reverse of its torch
  shape: a Linear weight (out, in) is stored as [in, out], and rows are quantized along `in`;
- 1-D and small tensors are F32 (biases, norm scales), the large 2-D weights quantized.

Quantized weights stay in their blocks in memory: each Linear of the double and single blocks with a
quantized weight becomes a `GgufLinear`, whose `weight` is a uint8 buffer of the file's bytes (so
`state_dict()`, `.to()`, offload and `torch.compile` see it) dequantized to the compute dtype at each call
(flux/weights/gguf_blocks.py). F32, F16 and BF16 tensors, and quantized ones outside the blocks (the embedders
and final layer, which the pipeline reads the compute dtype off), become ordinary tensors in `dtype`.

The file is parsed here rather than with `gguf.GGUFReader`, for the same reason flux/weights/checkpoint.py parses
safetensors itself: every size a file declares is checked against the file before it is used, and every failure
is a `CheckpointError` naming the file and the tensor. (GGUFReader walks a metadata array element by element
even past the end of the file: a mutated array length of 2⁶⁰ never returns.) The tensors are views of a private
memory map: nothing is copied, the weights are paged in from the file as they are used.
"""

import dataclasses
import math
import mmap
import struct
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn

from flux.modules.transformer import Flux
from flux.weights.checkpoint import CheckpointError, load_into
from flux.weights.gguf_blocks import BY_ID, OTHER_TYPES, TYPES, BlockType, dequantize
from flux.weights.layouts import infer_flux_params
from flux.weights.quantized import BLOCK_TARGETS, QuantizedLinear, quantized_layers, replace_linears

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 used 32-bit counts and is long gone; 2 and 3 differ only in big-endian support
DEFAULT_ALIGNMENT = 32  # of every tensor's data offset, unless `general.alignment` says otherwise
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_NESTING = 4  # arrays of arrays in the metadata; no real file nests at all
# The metadata value types: id -> struct format (scalars), or the name of a variable-length type.
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class GgufTensor:
    """One tensor of a GGUF file: its type, torch shape, and bytes.

    `data` is, for F32/F16/BF16, the tensor itself (a view of the file); for a quantized type, the raw blocks as
    (rows, bytes per row) uint8, a row being shape[-1] weights.
    """

    kind: BlockType
    shape: tuple[int, ...]
    data: Tensor

    @property
    def quantized(self) -> bool:
        return self.kind.quantized

    def dequantize(self) -> Tensor:
        """The tensor as fp32, in its torch shape."""
        if not self.quantized:
            return self.data.float()
        blocks = rearrange(self.data, "R (G Y) -> (R G) Y", Y=self.kind.bytes)
        return dequantize(blocks, self.kind).reshape(self.shape)


# --------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------

class GgufLinear(QuantizedLinear):
    """A Linear whose weight is GGUF blocks: y = x · dequantize(blocks)ᵀ + b.

    `weight` is a uint8 buffer (out, bytes per row) holding the file's blocks as they are; the type and the
    (out, in) shape are kept beside it. The bias is an ordinary tensor in the compute dtype.
    """

    def __init__(self, blocks: Tensor, kind: BlockType, *, in_features: int, bias: Tensor | None):
        row_bytes = in_features // kind.block * kind.bytes
        if not kind.quantized or in_features % kind.block or blocks.dtype != torch.uint8 or blocks.shape[1:] != (row_bytes,):
            raise ValueError(f"GgufLinear takes (out, {row_bytes}) uint8 {kind.name} blocks for {in_features} inputs, "
                             f"got {blocks.dtype} {tuple(blocks.shape)}")
        super().__init__(in_features, blocks.shape[0], bias=bias)
        del self.weight  # nn.Linear's placeholder Parameter: the storage is a buffer under the same name
        self.register_buffer("weight", blocks)
        self.kind = kind

    def dequantize(self, dtype) -> Tensor:
        # The blocks in fp32 (exact: a few integer and fp16 products), then one rounding to the compute dtype.
        blocks = rearrange(self.weight, "O (G Y) -> (O G) Y", Y=self.kind.bytes)
        return dequantize(blocks, self.kind).reshape(self.out_features, self.in_features).to(dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight={self.kind.name}"


def gguf_layers(model: nn.Module) -> dict[str, GgufLinear]:
    return quantized_layers(model, GgufLinear)


# --------------------------------------------------------------------------------------------------
# The transformer from a file
# --------------------------------------------------------------------------------------------------

def load_gguf_flow_model(path, *, device="cpu", dtype=torch.bfloat16) -> Flux:
    """The FLUX transformer from a `.gguf` file, its blocks' quantized weights kept quantized; it computes in
    `dtype` (bf16, fp16 or fp32), in which every other tensor is held.

    The configuration is read off the tensors' shapes, as for safetensors files.
    """
    path = Path(path)
    if not isinstance(dtype, torch.dtype) or dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype={dtype}: a GGUF transformer computes in torch.bfloat16, float16 or float32 (its "
                         "quantized weights stay in the file's blocks whatever the compute dtype)")
    metadata, tensors = read_gguf(path)
    tensors = flux_tensors(metadata, tensors, source=path)
    stand_ins = {name: torch.empty(t.shape, device="meta") for name, t in tensors.items()}
    params = infer_flux_params(stand_ins, source=path)
    with torch.device("meta"):
        model = Flux(params)
    expected = model.state_dict()
    for name, tensor in tensors.items():
        if name in expected and tensor.shape != tuple(expected[name].shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {list(tensor.shape)} (GGUF dims "
                                  f"{list(reversed(tensor.shape))}), the model read off the file's other tensors "
                                  f"expects {list(expected[name].shape)}; the file is corrupt or mixes two models")
    linears = {name for name, module in model.named_modules() if type(module) is nn.Linear}
    kept = [name for name, t in tensors.items() if t.quantized and name.endswith(".weight")
            and name.removesuffix(".weight") in linears and name.startswith(tuple(p.rstrip("*") for p in BLOCK_TARGETS))]
    if kept:
        def make(name: str, linear: nn.Linear) -> GgufLinear:
            tensor = tensors[f"{name}.weight"]
            blocks = torch.empty(tensor.data.shape, dtype=torch.uint8, device="meta")
            return GgufLinear(blocks, tensor.kind, in_features=linear.in_features, bias=linear.bias)

        replace_linears(model, targets=[name.removesuffix(".weight") for name in kept], make=make)
    kept_names = set(kept)
    state_dict = {}
    for name, tensor in tensors.items():
        if name in kept_names:
            state_dict[name] = tensor.data
        elif tensor.quantized:  # outside the blocks, or not a Linear's weight: a small tensor, made plain once
            state_dict[name] = tensor.dequantize().to(dtype)
        else:
            # Copied (they are small) so that the memory map lives on only through the quantized weights.
            state_dict[name] = tensor.data.to(dtype, copy=True)
    return load_into(model, state_dict, source=path, device=device, dtype=dtype).eval().requires_grad_(False)


def flux_tensors(metadata: dict, tensors: dict[str, GgufTensor], *, source: Path) -> dict[str, GgufTensor]:
    """A GGUF file's tensors under the official names, after checking the file holds a FLUX transformer."""
    architecture = metadata.get("general.architecture")
    if architecture is not None and architecture != "flux":
        raise CheckpointError(f"{source}: general.architecture is {architecture!r:.80}, not 'flux': the file holds "
                              "another model (a FLUX transformer's GGUF file says 'flux')")
    anchor = next((name for name in tensors if name.endswith("img_in.weight")), None)
    if anchor is None:
        diffusers = any(name.endswith("x_embedder.weight") for name in tensors)
        raise CheckpointError(f"{source}: not a FLUX transformer: no 'img_in.weight' tensor" + (
            " (its names are diffusers'; GGUF files of FLUX use Black Forest Labs' names, as `flux quantize` writes them)"
            if diffusers else f" among its {len(tensors)} tensors {list(tensors)[:4]}"))
    prefix = anchor.removesuffix("img_in.weight")
    # A bundle or a stable-diffusion.cpp file (`model.diffusion_model.` ...): keep the transformer's part.
    return {name[len(prefix):]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}


# --------------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------------
# Little-endian throughout: magic "GGUF", version u32, tensor count u64, metadata count u64; the metadata as
# (key string, type u32, value); per tensor (name string, n_dims u32, dims u64 × n_dims innermost first, type
# u32, offset u64 from the data start); padding to the alignment; the data. A string is a u64 length and UTF-8.

def read_gguf(path) -> tuple[dict, dict[str, GgufTensor]]:
    """(metadata {key: value}, tensors {name: GgufTensor}) of a `.gguf` file, memory-mapped.

    Metadata arrays are skipped, recorded as ("array", count): a transformer file needs none of them.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found" if not path.exists() else f"{path}: is not a file (expected a .gguf file)")
    with open(path, "rb") as file:
        if path.stat().st_size < 24:
            raise CheckpointError(f"{path}: not a GGUF file ({path.stat().st_size} bytes, shorter than a GGUF header); re-download it")
        buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    header = _Header(buffer, path)
    if header.take(4) != MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
    version = header.scalar("I")
    if version not in VERSIONS:
        endian = " (big-endian files are not supported)" if version >= 1 << 24 else ""
        raise CheckpointError(f"{path}: GGUF version {version}{endian}; versions {VERSIONS} are read")
    tensor_count, metadata_count = header.scalar("Q"), header.scalar("Q")
    # Each entry takes at least 12 (metadata) or 24 (tensor info) bytes: counts the file cannot hold are refused
    # before any loop runs over them.
    if metadata_count * 12 + tensor_count * 24 > header.remaining:
        raise CheckpointError(f"{path}: declares {tensor_count} tensors and {metadata_count} metadata entries, more "
                              f"than its {len(buffer)} bytes can hold; the file is truncated or corrupt")
    metadata, types = {}, {}
    for _ in range(metadata_count):
        key = header.string("a metadata key")
        if key in metadata:
            raise CheckpointError(f"{path}: metadata key {key!r:.80} appears twice; the file is corrupt")
        types[key] = header.scalar("I")
        metadata[key] = header.value(types[key], key, depth=0)
    # The two keys a reader acts on, with the types the format gives them (as ggml's own reader requires).
    for key, type_id, what in [("general.alignment", 4, "a uint32"), ("general.architecture", STRING, "a string")]:
        if key in types and types[key] != type_id:
            raise CheckpointError(f"{path}: {key} has value type {types[key]}; the format makes it {what}")
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment == 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{path}: general.alignment is {alignment}; it must be a power of two")
    infos = {}
    for _ in range(tensor_count):
        name = header.string("a tensor name")
        if name in infos:
            raise CheckpointError(f"{path}: tensor {name!r:.80} appears twice; the file is corrupt")
        infos[name] = _tensor_info(header, name, alignment)
    data_start = -(-header.position // alignment) * alignment
    data_size = len(buffer) - data_start
    tensors, position = {}, 0
    for name, (kind, shape, offset, size) in sorted(infos.items(), key=lambda item: item[1][2]):
        if offset < position or offset + size > data_size:
            raise CheckpointError(f"{path}: tensor {name!r}: its {size} bytes at data offset {offset} "
                                  + ("overlap the previous tensor's" if offset < position else
                                     f"run past the end of the file's {max(data_size, 0)} data bytes")
                                  + "; the file is truncated or corrupt, re-download it")
        position = offset + size
        tensors[name] = GgufTensor(kind, shape, _view(buffer, data_start + offset, kind, shape))
    return metadata, {name: tensors[name] for name in infos}  # in the file's order


def _tensor_info(header: "_Header", name: str, alignment: int) -> tuple[BlockType, tuple[int, ...], int, int]:
    """(type, torch shape, data offset, bytes) of one tensor, each checked."""
    where = f"{header.path}: tensor {name!r:.120}"
    n_dims = header.scalar("I")
    if not 1 <= n_dims <= MAX_DIMS:
        raise CheckpointError(f"{where}: {n_dims} dimensions; GGUF tensors have 1 to {MAX_DIMS}")
    dims = [header.scalar("Q") for _ in range(n_dims)]
    type_id, offset = header.scalar("I"), header.scalar("Q")
    kind = BY_ID.get(type_id)
    if kind is None:
        known = OTHER_TYPES.get(type_id, f"unknown type id {type_id}")
        raise CheckpointError(f"{where}: its type is {known}, which flux does not read (supported: {', '.join(TYPES)}); "
                              "use a file of another quantization")
    # ~280 T values: no file holds that. Counted with empty dims as 1: an empty tensor stores no bytes, so nothing
    # else bounds its other dims, and torch needs them to fit int64.
    if math.prod(max(n, 1) for n in dims) >= 2**48:
        raise CheckpointError(f"{where}: dims {dims} are too large for any tensor; the file is corrupt")
    if dims[0] % kind.block:
        raise CheckpointError(f"{where}: rows of {dims[0]} weights cannot be cut into {kind.name}'s blocks of "
                              f"{kind.block}; the file is corrupt")
    if offset % alignment:
        raise CheckpointError(f"{where}: data offset {offset} is not a multiple of the alignment {alignment}; the file is corrupt")
    return kind, tuple(reversed(dims)), offset, math.prod(dims) // kind.block * kind.bytes


def _view(buffer, begin: int, kind: BlockType, shape: tuple[int, ...]) -> Tensor:
    """The tensor's bytes in the map: typed and shaped for F32/F16/BF16, (rows, bytes per row) uint8 otherwise."""
    rows, row = math.prod(shape[:-1]), shape[-1] // kind.block * kind.bytes
    if rows * row == 0:
        raw = torch.empty(rows * row, dtype=torch.uint8)
    else:
        raw = torch.frombuffer(buffer, dtype=torch.uint8, count=rows * row, offset=begin)
    if kind.quantized:
        return raw.reshape(rows, row)
    dtype = FLOAT_DTYPES[kind.name]
    if begin % dtype.itemsize:
        raw = raw.clone()  # viewing bytes as a wider dtype needs aligned storage
    return raw.view(dtype).reshape(shape)


class _Header:
    """A cursor over the header bytes whose every read is bounds-checked (a truncated file ends here)."""

    def __init__(self, buffer, path: Path):
        self.buffer, self.path, self.position = buffer, path, 0

    @property
    def remaining(self) -> int:
        return len(self.buffer) - self.position

    def take(self, count: int) -> bytes:
        if count > self.remaining:
            raise CheckpointError(f"{self.path}: the header ends past the end of the file (at byte {self.position} "
                                  f"it needs {count} more of {self.remaining}); the file is truncated, re-download it")
        chunk = self.buffer[self.position:self.position + count]
        self.position += count
        return chunk

    def scalar(self, code: str):
        return struct.unpack("<" + code, self.take(struct.calcsize(code)))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.scalar("Q"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: {what} at byte {self.position - len(raw)} is not UTF-8; the file is corrupt") from None

    def value(self, type_id: int, key: str, *, depth: int):
        if type_id in SCALARS:
            return self.scalar(SCALARS[type_id])
        if type_id == STRING:
            return self.string(f"the value of {key!r:.80}")
        if type_id == ARRAY and depth < MAX_NESTING:
            item_type, count = self.scalar("I"), self.scalar("Q")
            if item_type in SCALARS:  # skipped whole: its size is known
                self.take(count * struct.calcsize(SCALARS[item_type]))
            else:
                if count * 8 > self.remaining:  # every string or array item takes at least 8 bytes
                    raise CheckpointError(f"{self.path}: metadata {key!r:.80} declares {count} items, more than the "
                                          "file holds; the file is truncated or corrupt")
                for _ in range(count):
                    self.value(item_type, key, depth=depth + 1)
            return ("array", count)
        raise CheckpointError(f"{self.path}: metadata {key!r:.80} has value type {type_id}, which GGUF does not "
                              "define" + (" (arrays nested too deep)" if type_id == ARRAY else "") + "; the file is corrupt")
