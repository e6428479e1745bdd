"""A procedural data set of captioned shapes: what the small built-in model (weights/flux-tiny) learned to draw.

Each picture is one shape (circle, square or triangle) in one of eight named colours, on a flat background
of another named colour, at one of five positions (left, right, top, bottom, centre) and in one of two sizes,
with a caption that says all of it: "a small red circle at the top of a blue background". Captions may leave
the size or the position out ("a red circle on a blue background"); the picture then shows the defaults, a
large shape at the centre, so that a short prompt still names one clear picture.

Everything is drawn from a seed (`random.Random`), so the same seed gives the same pictures and captions on
every machine. Shapes are drawn at 4× the size and downsampled, which antialiases their edges.

`COLOURS` is the ground truth a test can check a generated picture against (tests/test_builtin.py).
`caption` is the data set's one plain grammar; the built-in model is trained on many phrasings of each scene
(`flux.training.captions`) and evaluated on others (`flux.training.heldout_captions`).
"""

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

# Named colours, far apart in RGB so that the nearest name to a pixel is unambiguous.
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Centre of the shape as a fraction of the image's width and height (x to the right, y down).
POSITIONS = {"centre": (0.5, 0.5), "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27),
             "bottom": (0.5, 0.73)}
# Half the shape's extent as a fraction of the image side: a large shape at the left still fits.
SIZES = {"small": 0.11, "large": 0.22}
DEFAULT_POSITION, DEFAULT_SIZE = "centre", "large"  # what a caption that leaves them out means

JITTER = 0.03  # the shape's centre moves by up to this fraction of the side, so no two pictures are equal
SUPERSAMPLING = 4


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    position: str = DEFAULT_POSITION
    size: str = DEFAULT_SIZE

    def __post_init__(self):
        for name, value, allowed in (("shape", self.shape, SHAPES), ("colour", self.colour, COLOURS),
                                     ("background", self.background, COLOURS),
                                     ("position", self.position, POSITIONS), ("size", self.size, SIZES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        if self.colour == self.background:
            raise ValueError(f"the shape and the background must differ in colour, both are {self.colour!r}")


def caption(scene: Scene, *, with_size: bool = True, with_position: bool = True, spelling: str = "centre") -> str:
    """The scene in words: "a small red circle at the top of a blue background".

    Without the size or the position the caption describes the same scene only if they are the defaults
    (large, centre); `random_sample` drops them only then. `spelling` is "centre" or "center".
    """
    words = ([scene.size] if with_size else []) + [scene.colour, scene.shape]
    text = f"{article(words[0])} {' '.join(words)}"
    if with_position:
        place = spelling if scene.position == "centre" else scene.position
        return f"{text} at the {place} of {article(scene.background)} {scene.background} background"
    return f"{text} on {article(scene.background)} {scene.background} background"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def random_scene(rng: random.Random) -> Scene:
    colour, background = rng.sample(sorted(COLOURS), 2)
    return Scene(shape=rng.choice(SHAPES), colour=colour, background=background,
                 position=rng.choice(list(POSITIONS)), size=rng.choice(list(SIZES)))


def random_caption(scene: Scene, rng: random.Random) -> str:
    """One of the scene's captions: the full one mostly, a shorter one (leaving out defaults) sometimes."""
    with_size = scene.size != DEFAULT_SIZE or rng.random() < 0.6
    with_position = scene.position != DEFAULT_POSITION or rng.random() < 0.6
    return caption(scene, with_size=with_size, with_position=with_position, spelling=rng.choice(("centre", "center")))


def render(scene: Scene, *, image_size: int, rng: random.Random | None = None) -> Image.Image:
    """The scene as an RGB image of `image_size`² pixels; `rng` (if given) jitters the shape's position."""
    side = image_size * SUPERSAMPLING
    x, y = POSITIONS[scene.position]
    if rng is not None:
        x, y = x + rng.uniform(-JITTER, JITTER), y + rng.uniform(-JITTER, JITTER)
    cx, cy, r = x * side, y * side, SIZES[scene.size] * side
    picture = Image.new("RGB", (side, side), COLOURS[scene.background])
    draw = ImageDraw.Draw(picture)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        s = 0.9 * r  # a square of the circle's width looks larger than the circle; this evens them out
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    else:  # pointing up, as wide as it is tall, centred on its bounding box
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return picture.resize((image_size, image_size), Image.BOX)


def random_sample(rng: random.Random, *, image_size: int) -> tuple[Image.Image, str]:
    scene = random_scene(rng)
    return render(scene, image_size=image_size, rng=rng), random_caption(scene, rng)


def make_dataset(count: int, *, seed: int, image_size: int) -> tuple[torch.Tensor, list[str]]:
    """`count` samples from `seed` -> (count, 3, image_size, image_size) images in [-1, 1] and their captions."""
    rng = random.Random(seed)
    images, captions = [], []
    for _ in range(count):
        picture, text = random_sample(rng, image_size=image_size)
        images.append(np.asarray(picture))
        captions.append(text)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
    return pixels.float() / 127.5 - 1, captions


def vocabulary() -> list[str]:
    """Every word a caption can use, in a fixed order."""
    words = ["a", "an", "at", "the", "of", "on", "background", "center", *SIZES, *COLOURS, *SHAPES, *POSITIONS]
    return list(dict.fromkeys(words))


def nearest_colour(rgb) -> str:
    """The name in `COLOURS` closest (in RGB) to a colour given as three numbers in [0, 255]."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return min(COLOURS, key=lambda name: float(np.sum((np.asarray(COLOURS[name]) - rgb) ** 2)))
