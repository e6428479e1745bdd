"""The `flux` command: `flux generate "a prompt" -o out.png`. It parses arguments and calls `flux.Pipeline`.
`flux train ...` is `python -m flux.training ...` (see `flux train --help`); `flux serve ...` is the server of
flux/serve/command.py (see `flux serve --help`); `flux quantize IN OUT.gguf --type Q4_0` writes a GGUF file
(flux/cli/quantize.py).

Exit codes: 0 done, 2 bad arguments (or a bad model path), 1 anything else. User errors print one line,
never a traceback.
"""

import argparse
import logging
import sys
from pathlib import Path

import torch

from flux.cli import quantize

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="flux", description="FLUX.1 text-to-image in pure PyTorch.")
    commands = main.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="FLUX.1 repository folder or Hugging Face repo id (default: the built-in tiny model)")
    gen.add_argument("-o", "--output", default="out.png", help="PNG path; several images get _0, _1, ... suffixes")
    gen.add_argument("--width", type=int, default=None, help="multiple of 16 (default: the model's, 1024 for FLUX.1)")
    gen.add_argument("--height", type=int, default=None, help="multiple of 16 (default: the model's, 1024 for FLUX.1)")
    gen.add_argument("--steps", type=int, default=None, help="default: 4 for schnell, 50 for dev")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--guidance", type=float, default=None, help="distilled guidance (dev-style models only)")
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--image", type=Path, action="append", help="image-to-image's start; Fill's picture; a Kontext "
                     "reference (repeat --image for several)")
    gen.add_argument("--mask", type=Path, help="Fill: where to repaint (white) and keep (black)")
    gen.add_argument("--control-image", type=Path, help="Canny/Depth (or a control LoRA): the edge or depth map")
    gen.add_argument("--lora", type=Path, help="a LoRA file to load first (a control LoRA makes dev a control model)")
    gen.add_argument("--no-auto-resize", action="store_true", help="Kontext: keep the references' own sizes "
                     "instead of the nearest trained resolution")
    gen.add_argument("--strength", type=float, default=None, help="image-to-image strength in (0, 1] (default 0.8; "
                     "Fill 1)")
    gen.add_argument("--redux", help="FLUX.1-Redux-dev folder or repo id: condition on --redux-image (image variation)")
    gen.add_argument("--redux-image", type=Path, action="append", default=[],
                     help="image whose FLUX.1 Redux tokens join the prompt's (repeatable: all of them, in order)")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="compute dtype (default: bf16 on GPUs and on CPUs with bf16 instructions, else fp32)")
    gen.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    # Bare --offload is "model", what it meant before "blocks" existed.
    gen.add_argument("--offload", nargs="?", const="model", default=False, choices=["model", "blocks"],
                     help="keep weights on the CPU: 'model' (or bare --offload) moves each component to the device only "
                          "while it runs, 'blocks' also streams the transformer through it block by block")
    gen.add_argument("--fp8", action="store_true", help="store the transformer's block weights in fp8 (float8_e4m3fn, "
                     "about 12 GB for FLUX.1) and compute in --dtype (on a CPU without bf16 instructions: --dtype fp32)")
    gen.add_argument("--quantize", choices=["int8"], default=None,
                     help="int8: the transformer's block products in int8 (W8A8), half its memory; faster on CPUs with VNNI")
    gen.add_argument("--transformer", type=Path, help="a transformer file to use instead of --model's (a .gguf, an fp8 "
                     "or any single file flux reads); the text encoders and autoencoder still come from --model")
    gen.add_argument("--quiet", action="store_true", help="no progress bar, no messages")
    quantize.add_parser(commands)
    # Listed for `flux --help`; `main` hands everything after `train` to flux.training.command, which has its own flags.
    commands.add_parser("train", help="fine-tune on a folder of images with captions (flux train --help)", add_help=False)
    commands.add_parser("serve", help="serve a model over the OpenAI Images API (flux serve --help)", add_help=False)
    return main


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        from flux.training.command import main as train

        return train(argv[1:])
    if argv[:1] == ["serve"]:
        from flux.serve.command import main as serve

        return serve(argv[1:])
    args = parser().parse_args(argv)  # exits with 2 on malformed arguments
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.INFO, format="flux: %(message)s")
    from PIL import PngImagePlugin

    from flux.weights.checkpoint import CheckpointError
    from flux.pipelines.pipeline import Pipeline
    from flux.pipelines.redux import load_redux
    from flux.pipelines.requests import check_request, image_seeds
    from flux.pipelines.snapshots import builtin_model

    try:
        if args.command == "quantize":
            quantize.run(args)
            return 0
        pictures = [read_image("--image", path) for path in args.image or []]
        # One --image is one picture; several are Kontext's references (the model says which it takes).
        image = None if not pictures else pictures[0] if len(pictures) == 1 else pictures
        mask = None if args.mask is None else read_image("--mask", args.mask)
        control = None if args.control_image is None else read_image("--control-image", args.control_image)
        if args.lora is not None and not args.lora.is_file():
            raise ValueError(f"--lora {args.lora}: file not found")
        redux_images = [read_image("--redux-image", path) for path in args.redux_image]
        if bool(redux_images) != (args.redux is not None):
            raise ValueError("--redux FOLDER and --redux-image PATH go together (the Redux model and the image(s))")
        # Before loading the model: a bad size should not cost a 30 GB read.
        check_request([args.prompt], width=args.width, height=args.height, num_steps=args.steps,
                      num_images_per_prompt=args.num_images, strength=args.strength)
        # One seed per image, seed + i: each image reproducible alone, and equal to the server's (flux serve).
        seeds = image_seeds(args.seed, args.num_images)
        model = args.model if args.model is not None else builtin_model()
        # Redux first, small: a wrong folder should not cost the transformer's read. Same device and dtype choice.
        redux = None if args.redux is None else load_redux(args.redux, device=args.device, dtype=DTYPES.get(args.dtype))
        # One call per process: the text encoders are never needed again once the prompt is encoded, and the
        # transformer's memory-mapped pages go back to the page cache block by block (flux/weights/pages.py).
        pipe = Pipeline.from_pretrained(model, device=args.device, dtype=DTYPES.get(args.dtype), offload=args.offload,
                                        release_text_encoders=True, release_pages=True, fp8=args.fp8,
                                        quantize=args.quantize, transformer=args.transformer)
        if args.lora is not None:
            pipe.load_lora(args.lora)
        images = pipe(args.prompt, width=args.width, height=args.height, num_steps=args.steps,
                      guidance=args.guidance, seed=seeds, num_images_per_prompt=args.num_images, image=image,
                      strength=args.strength, progress=not args.quiet, redux_image=redux_images or None, redux=redux,
                      mask_image=mask, control_image=control, auto_resize=False if args.no_auto_resize else None)
    except (ValueError, CheckpointError) as error:
        print(f"flux: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - the one place that turns failures into an exit code
        print(f"flux: failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1

    output = Path(args.output)
    paths = [output] if len(images) == 1 else [output.with_name(f"{output.stem}_{i}{output.suffix or '.png'}") for i in range(len(images))]
    for picture, path in zip(images, paths):
        metadata = PngImagePlugin.PngInfo()
        for key, value in picture.info.items():
            metadata.add_text(key, str(value))
        metadata.add_text("model", str(model))
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path, pnginfo=metadata)
        if not args.quiet:
            print(f"flux: wrote {path}", file=sys.stderr)
    return 0


def read_image(option: str, path: Path):
    """A PIL image from a file, or a ValueError naming the option."""
    from PIL import Image

    if not path.is_file():
        raise ValueError(f"{option} {path}: file not found")
    try:
        image = Image.open(path)
        image.load()
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"{option} {path}: not an image this program can read ({error})") from None
    return image


if __name__ == "__main__":
    sys.exit(main())
