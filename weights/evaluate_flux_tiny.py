"""How well the built-in model follows prompts it was not trained on: `python weights/evaluate_flux_tiny.py`.

The prompts are `flux.training.heldout_captions.heldout_prompts`: templates, synonyms and fillers disjoint
from the training captions'. Each is generated at the model's default size with its own seed, and the
picture is read back against the scene the prompt describes, with the data set's named colours
(`flux.training.shapes.COLOURS`) as the only reference:

  colour      the named colour nearest to the mean of the pixels inside the shape's expected place
              (a square 0.7 times the shape's half-extent, around its centroid) is the shape's colour;
  background  the commonest nearest named colour of the border pixels (3 pixels wide) is the background's;
  position    the pixels whose nearest named colour is not the background's (the drawn shape) have their
              centre nearest to the prompt's position among the five the data set has;
  size        those pixels cover an area nearer (in log scale) to the prompt's size than to the other one,
              the areas measured on the data set's own renderings of that shape.

It prints one line per attribute (and the prompts that failed, with --failures), the table of
weights/README.md. Seeds are fixed, so a run is repeatable on one machine.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from flux.pipelines.pipeline import Pipeline
from flux.pipelines.snapshots import BUILTIN
from flux.training import shapes
from flux.training.heldout_captions import heldout_prompts

ATTRIBUTES = ("colour", "background", "position", "size")
BORDER = 3  # pixels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=BUILTIN)
    parser.add_argument("--count", type=int, default=1000, help="held-out prompts")
    parser.add_argument("--seed", type=int, default=2026, help="of the prompts; image i uses seed i")
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's own)")
    parser.add_argument("--failures", action="store_true", help="print the prompts that failed")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    pipe = Pipeline.from_pretrained(args.model, device="cpu")
    pairs = heldout_prompts(args.count, seed=args.seed)
    start = time.perf_counter()
    results = []
    for first in range(0, len(pairs), args.batch):
        chunk = pairs[first : first + args.batch]
        images = pipe([prompt for _, prompt in chunk], seed=list(range(first, first + len(chunk))),
                      num_steps=args.steps, output_type="np", progress=False)
        for (scene, prompt), image in zip(chunk, images):
            results.append((scene, prompt, read_picture((image * 255).round().astype(np.uint8), scene)))
    elapsed = time.perf_counter() - start
    print(f"{len(results)} held-out prompts (seed {args.seed}) with {args.model}, {elapsed:.0f} s")
    print("| attribute | right | accuracy |\n|---|---|---|")
    for attribute in ATTRIBUTES:
        right = sum(found[attribute] for _, _, found in results)
        print(f"| {attribute} | {right} / {len(results)} | {100 * right / len(results):.1f} % |")
    if args.failures:
        for scene, prompt, found in results:
            wrong = [attribute for attribute in ATTRIBUTES if not found[attribute]]
            if wrong:
                print(f"{prompt!r}: {', '.join(wrong)} wrong ({scene})")
    return 0


def read_picture(picture: np.ndarray, scene: shapes.Scene) -> dict[str, bool]:
    """An (H, W, 3) uint8 picture and the scene its prompt describes -> {attribute: drawn as described}."""
    side = picture.shape[0]
    names = nearest_names(picture)  # (H, W) index into COLOURS
    colour_names = list(shapes.COLOURS)
    x, y = shapes.POSITIONS[scene.position]
    extent = shapes.SIZES[scene.size]
    if scene.shape == "triangle":  # pointing up: its widest, surest part is below its box's centre
        y += extent / 3
    half = max(1, round(0.35 * extent * side))
    row, column = round(y * side), round(x * side)
    patch = picture[row - half : row + half, column - half : column + half].reshape(-1, 3).astype(np.float64)
    colour = shapes.nearest_colour(patch.mean(axis=0))
    border = np.concatenate([names[:BORDER].ravel(), names[-BORDER:].ravel(), names[:, :BORDER].ravel(),
                             names[:, -BORDER:].ravel()])
    background = colour_names[np.bincount(border, minlength=len(colour_names)).argmax()]
    mask = names != colour_names.index(scene.background)  # the drawn shape: whatever is not background
    found = dict(colour=colour == scene.colour, background=background == scene.background, position=False, size=False)
    if mask.sum() == 0:
        return found
    rows, columns = np.nonzero(mask)
    centre = (columns.mean() + 0.5) / side, (rows.mean() + 0.5) / side
    nearest = min(shapes.POSITIONS, key=lambda p: (shapes.POSITIONS[p][0] - centre[0]) ** 2 + (shapes.POSITIONS[p][1] - centre[1]) ** 2)
    found["position"] = nearest == scene.position
    areas = {size: reference_area(scene.shape, size, side) for size in shapes.SIZES}
    drawn = min(areas, key=lambda size: abs(np.log(mask.sum() / areas[size])))
    found["size"] = drawn == scene.size
    return found


def nearest_names(picture: np.ndarray) -> np.ndarray:
    """(H, W, 3) pixels -> (H, W) index of the nearest named colour (in RGB)."""
    palette = np.asarray(list(shapes.COLOURS.values()), dtype=np.float64)  # (K, 3)
    distance = ((picture[:, :, None, :].astype(np.float64) - palette) ** 2).sum(-1)  # (H, W, K)
    return distance.argmin(-1)


def reference_area(shape: str, size: str, side: int) -> int:
    """Pixels of the data set's own rendering (no jitter) nearer the shape's colour than the background's."""
    scene = shapes.Scene(shape, "white", "black", size=size)
    picture = np.asarray(shapes.render(scene, image_size=side), dtype=np.float64)
    return int((picture.mean(-1) > 127.5).sum())


if __name__ == "__main__":
    sys.exit(main())
