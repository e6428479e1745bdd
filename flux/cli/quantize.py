"""`flux quantize IN OUT.gguf --type Q4_0`: any transformer flux loads, written as a GGUF file.

IN is whatever `flux.load_flow_model` reads: the official bf16 file, a diffusers `transformer/` folder, a snapshot
folder, an fp8 file, another GGUF. The work is `flux.weights.gguf_save.save_gguf`; this file parses the
arguments. The result loads with `flux.load_flow_model(OUT)` and in ComfyUI-GGUF, and `flux generate
--transformer OUT --model FOLDER` generates from it.
"""

from pathlib import Path

from flux.weights.gguf_save import WRITABLE, save_gguf


def add_parser(commands) -> None:
    command = commands.add_parser("quantize", help="write a transformer as a GGUF file (Q8_0, Q4_0, ...)",
                                  description=__doc__.split("\n\n")[0])
    command.add_argument("input", type=Path, help="a transformer file or folder (safetensors, fp8, GGUF, diffusers)")
    command.add_argument("output", type=Path, help="the .gguf file to write")
    command.add_argument("--type", required=True, choices=WRITABLE,
                         help="type of the blocks' 2-D weights (Q4_0 ≈ 4.5 bits a weight, Q8_0 ≈ 8.5); the rest is F32")
    command.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> None:
    """Raises ValueError (CheckpointError included) for the user's mistakes; `flux.cli.main` prints them."""
    if args.output.suffix.lower() != ".gguf":
        raise ValueError(f"{args.output}: the output is a GGUF file; name it *.gguf")
    if args.output.exists() and args.input.exists() and args.output.resolve() == args.input.resolve():
        raise ValueError(f"{args.output}: is the input; write to another file")
    save_gguf(_load(args.input), args.output, type=args.type, progress=not args.quiet)


def _load(path: Path):
    """The transformer as stored, without a second full-precision copy: safetensors in their own float dtype
    (bf16 files zero-copy from their memory map), fp8 files kept fp8, GGUF files kept quantized with their F32
    tensors in fp32; each quantized layer is made fp32 only as it is written."""
    import torch  # here, as `flux.cli.main` imports the loaders only once a command runs

    from flux.weights.fp8 import FP8
    from flux.weights.layouts import read_flow_checkpoint
    from flux.weights.loading import is_gguf, load_flow_model

    if is_gguf(path):
        return load_flow_model(path, dtype=torch.float32)
    tensors, _ = read_flow_checkpoint(path)
    if any(tensor.dtype == FP8 for tensor in tensors.values()):
        return load_flow_model(path, dtype=FP8)
    stored = tensors["img_in.weight"].dtype if "img_in.weight" in tensors else torch.bfloat16
    return load_flow_model(path, dtype=stored if stored in (torch.float32, torch.float16) else torch.bfloat16)
