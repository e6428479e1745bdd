"""`save_gguf`: a FLUX transformer written as a GGUF file in the published files' conventions.

What city96's FLUX.1 GGUF files hold, and ComfyUI-GGUF's `tools/convert.py` writes:
- `general.architecture` "flux", `general.quantization_version` and `general.file_type` (llama.cpp's
  `LlamaFileType` number of the chosen type);
- Black Forest Labs' tensor names, dims innermost first (the writer reverses the torch shapes);
- the chosen type for the 2-D weights of the double and single blocks, and F32 for everything else: the 1-D
  tensors (biases, norm scales) and tensors of at most 1024 values (convert.py's threshold: they cost nothing
  and skip a dequantization), and the embedders and final layer (convert.py keeps them at full precision:
  the first and last maps of every step). F32 because the sources are bf16, which F32 holds exactly and F16
  does not. A weight whose rows do not split into the type's blocks is F32 too, as convert.py falls back.

The quantizers are the `gguf` package's (llama.cpp's own numpy ports, `gguf.quants.quantize`): Q8_0, Q5_1,
Q5_0, Q4_1, Q4_0, BF16, F16. It cannot make K-quants (they need llama.cpp's search over scales).

Streamed: the header is written from the shapes, then one tensor at a time is made (dequantized from fp8 or
GGUF storage when the model holds it so), quantized, written and dropped; the peak memory is the model as
loaded plus one layer in fp32.
"""

import math
import os
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from flux.weights.gguf_blocks import TYPES
from flux.weights.quantized import BLOCK_TARGETS, quantized_layers

WRITABLE = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "BF16", "F16")
SMALL = 1024  # values; at most this many stay F32 (convert.py's QUANTIZATION_THRESHOLD)


def save_gguf(model: nn.Module, path, *, type: str, progress: bool = True) -> dict[str, str]:
    """Writes `model` (a `Flux`, plain, fp8 or GGUF-quantized) to `path` as GGUF with its blocks' 2-D weights in
    `type`; returns {tensor name: GGUF type written}."""
    gguf = import_gguf()
    if type not in WRITABLE:
        raise ValueError(f"type={type!r}: flux quantize writes {', '.join(WRITABLE)} (K-quants need llama.cpp's "
                         "llama-quantize)")
    state = model.state_dict()
    carried = [name for name in state if ".lora." in name]
    if carried:
        raise ValueError(f"the model carries a LoRA ({carried[0]!r}, ...): unload_lora first, or save it with save_lora")
    layers = quantized_layers(model)
    # The tensors to write: a quantized layer's weight as the weights it stands for; its extra storage
    # (fp8's scale_weight) is folded into them.
    shapes = {}
    for name, tensor in state.items():
        layer, _, leaf = name.rpartition(".")
        if layer in layers and leaf != "bias":
            if leaf == "weight":
                shapes[name] = (layers[layer].out_features, layers[layer].in_features)
            continue
        shapes[name] = tuple(tensor.shape)
    chosen = {name: type_for(name, shape, type) for name, shape in shapes.items()}

    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, f"MOSTLY_{type}")))
    for name, shape in shapes.items():
        kind = TYPES[chosen[name]]
        writer.add_tensor_info(name, shape, _numpy_dtype(chosen[name]), math.prod(shape) // kind.block * kind.bytes,
                               raw_dtype=gguf.GGMLQuantizationType[chosen[name]])
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name in tqdm(shapes, desc=f"writing {type}", unit="tensor", disable=not progress):
            layer, _, leaf = name.rpartition(".")
            tensor = layers[layer].dequantize(torch.float32) if layer in layers and leaf == "weight" else state[name]
            values = tensor.detach().to("cpu", torch.float32).numpy()
            writer.write_tensor_data(gguf.quants.quantize(values, gguf.GGMLQuantizationType[chosen[name]]))
        writer.close()
        os.replace(partial, path)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    return chosen


def type_for(name: str, shape: tuple[int, ...], wanted: str) -> str:
    """The GGUF type a tensor is written in (see the module docstring)."""
    in_blocks = name.startswith(tuple(pattern.rstrip("*") for pattern in BLOCK_TARGETS))
    if len(shape) != 2 or math.prod(shape) <= SMALL or not in_blocks or shape[-1] % TYPES[wanted].block:
        return "F32"
    return wanted


def import_gguf():
    """The `gguf` package, or an error saying how to get it."""
    try:
        import gguf
    except ImportError:
        raise ImportError("writing GGUF files needs the gguf package: pip install 'flux[gguf]' (or pip install gguf)") from None
    return gguf


def _numpy_dtype(name: str):
    import numpy as np

    # Only the writer's bookkeeping reads it; with a raw type given, any dtype but uint8 means "shape in weights".
    return np.float16 if name == "F16" else np.float32
