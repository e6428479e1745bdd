"""Captions in many phrasings for the coloured-shapes data set (`flux.training.shapes`): what the built-in
model (weights/flux-tiny) was trained to read.

`shapes.caption` says a scene in one fixed grammar ("a small red circle at the top of a blue background").
People do not write like that: they put the background first, write comma lists, say "backdrop" or
"middle", add "please draw" and "high quality", shout in capitals. `describe` draws one of many phrasings
of a scene from a seeded `random.Random`:

  - word orders: shape first, background first, position first, comma lists, "key: value" lists;
  - synonyms (`SYNONYMS`): backdrop, centre/center/middle, big/large, little/small, upper/lower, "on the
    left side", "near the bottom" ...;
  - fillers and politeness ("please draw", "an image of", "high quality", a full stop);
  - casing and punctuation; articles and defaults left out;
  - noise words: arbitrary English words (from a word list the caller gives, e.g. the build's dictionary)
    dropped in at random places or standing for the background's noun ("a red circle on a blue canvas"), so
    that the text encoders learn to read the colour, shape, position and size words and ignore the rest.

The scene (the picture's ground truth) stays with each caption: the caller keeps the `Scene` it passed.
A caption that leaves the size or the position out describes the data set's defaults (large, centre), as in
`shapes.random_caption`, so `describe` leaves them out only when the scene has them.

The held-out evaluation prompts (`flux.training.heldout_captions`) use other templates, other synonyms and
other fillers, none of them drawn here: a test checks that the two word sets do not meet.
"""

import random
from collections.abc import Sequence

from flux.training.shapes import DEFAULT_POSITION, DEFAULT_SIZE, Scene, article

# Every way a caption may say each attribute. The first entry is the data set's own word.
SHAPE_WORDS = {
    "circle": ("circle", "disc", "dot", "round shape", "circle shape"),
    "square": ("square", "box", "block", "square shape", "tile"),
    "triangle": ("triangle", "triangle shape", "wedge", "triangular shape"),
}
SIZE_WORDS = {
    "small": ("small", "little", "tiny", "smaller", "small-sized", "mini"),
    "large": ("large", "big", "huge", "giant", "large-sized", "massive"),
}
BACKGROUND_WORDS = ("background", "backdrop", "bg", "back ground", "background colour", "background color")
# Where the shape is, as a phrase that follows the shape ("a red circle <at the top>"); the background may be
# tied on with "of" only after the phrases marked `of`.
POSITION_PHRASES = {
    "left": ("at the left", "on the left", "on the left side", "to the left", "left", "at the left side",
             "near the left", "on the left edge", "left side"),
    "right": ("at the right", "on the right", "on the right side", "to the right", "right", "at the right side",
              "near the right", "on the right edge", "right side"),
    "top": ("at the top", "on top", "near the top", "upper", "top", "at the upper side", "up top",
            "in the top half", "top side"),
    "bottom": ("at the bottom", "near the bottom", "lower", "bottom", "at the lower side", "down low",
               "in the bottom half", "bottom side", "on the bottom"),
    "centre": ("at the centre", "at the center", "in the middle", "centered", "centred", "in the centre",
               "in the center", "middle", "central", "center", "centre"),
}
# Phrases after which "of the background" reads naturally ("at the top of a blue background").
OF_PHRASES = {"at the left", "at the right", "at the top", "at the bottom", "at the centre", "at the center",
              "in the middle", "in the centre", "in the center", "on the left side", "on the right side",
              "near the top", "near the bottom", "near the left", "near the right", "on the left edge",
              "on the right edge", "in the top half", "in the bottom half", "on the bottom"}
PREFIXES = ("", "", "", "please draw", "draw", "an image of", "a picture of", "a drawing of", "paint", "show",
            "generate", "make", "render", "a photo of", "a simple illustration of", "i want", "create",
            "please make", "an illustration of", "picture:", "image:")
SUFFIXES = ("", "", "", ".", "!", ", high quality", ", simple", ", flat colours", ", minimal", ", 4k",
            ", clean", " please", ", nothing else", ", flat design", ", high resolution", ", vector art")
ON_WORDS = ("on", "over", "on top of", "in front of", "with")  # shape <on> background
WITH_WORDS = ("with", "containing", "showing", "and", "holding", "having")  # background <having> shape

TEMPLATES = (
    "{shape} {position} of {background}",  # the data set's own grammar
    "{shape} {position} on {background}",
    "{shape} {on} {background} {position}",
    "{shape} {on} {background}, {position}",
    "{background} {having} {shape} {position}",
    "{background}, {shape} {position}",
    "{background}, {shape}, {position}",
    "{shape}, {background}, {position}",
    "{shape} {position}, {background}",
    "{position}: {shape}, {background}",
    "{position} {shape} on {background}",
    "{shape}; {background}; {position}",
    "{background} and {shape} {position}",
    "shape: {shape_noun}, colour: {colour}, background: {background_colour}, {position_key} {size_key}",
    "{colour} {shape_noun} {position} {background_colour} {background_noun}",
)


def describe(scene: Scene, rng: random.Random, *, noise_words: Sequence[str] = ()) -> str:
    """One caption of `scene`, drawn from `rng`: a template, synonyms, fillers, casing, noise words."""
    with_size = scene.size != DEFAULT_SIZE or rng.random() < 0.5
    with_position = scene.position != DEFAULT_POSITION or rng.random() < 0.5
    with_articles = rng.random() < 0.7
    size = rng.choice(SIZE_WORDS[scene.size]) if with_size else ""
    shape_noun = rng.choice(SHAPE_WORDS[scene.shape])
    background_noun = rng.choice(BACKGROUND_WORDS)
    if noise_words and rng.random() < 0.15:  # any noun can hold the background's colour: "a blue canvas"
        background_noun = rng.choice(noise_words)
    position = rng.choice(POSITION_PHRASES[scene.position]) if with_position else ""

    shape = join(size, scene.colour, shape_noun)
    if rng.random() < 0.8:
        background = join(scene.background, background_noun)
    else:  # the colour after the noun, or alone
        background = rng.choice((f"{background_noun} of {scene.background}", scene.background,
                                 f"{background_noun}: {scene.background}"))
    if with_articles:
        shape, background = f"{article(shape)} {shape}", f"{article(background)} {background}"
    template = rng.choice(TEMPLATES)
    if "of {background}" in template and position not in OF_PHRASES:
        template = "{shape} {position} on {background}"
    on, having = rng.choice(ON_WORDS), rng.choice(WITH_WORDS)
    text = template.format(
        shape=shape, background=background, position=position, on=on, having=having,
        shape_noun=join(size, shape_noun), colour=scene.colour, background_colour=scene.background,
        background_noun=background_noun, position_key=f"position: {position}," if position else "",
        size_key=f"size: {size}" if size else "")
    text = join(rng.choice(PREFIXES), text) + rng.choice(SUFFIXES)
    words = text.split()
    for _ in range(rng.choice((0, 0, 0, 1, 1, 2)) if noise_words else 0):  # distractors at random places
        words.insert(rng.randrange(len(words) + 1), rng.choice(noise_words))
    text = " ".join(words).replace(" ,", ",").strip(" ,;:")
    return recase(text, rng)


def join(*parts: str) -> str:
    """The non-empty parts with single spaces between them."""
    return " ".join(part for part in parts if part)


def recase(text: str, rng: random.Random) -> str:
    """Mostly lower case, sometimes a capital first letter, Title Case or ALL CAPS: prompts come in all of them."""
    style = rng.random()
    if style < 0.55:
        return text
    if style < 0.8:
        return text[:1].upper() + text[1:]
    if style < 0.9:
        return text.title()
    return text.upper()


def vocabulary() -> list[str]:
    """Every word `describe` can write (besides noise words), lower case, in a fixed order."""
    from flux.training.shapes import COLOURS

    phrases = [*COLOURS, *(w for words in SHAPE_WORDS.values() for w in words),
               *(w for words in SIZE_WORDS.values() for w in words), *BACKGROUND_WORDS,
               *(p for phrases in POSITION_PHRASES.values() for p in phrases), *PREFIXES, *SUFFIXES, *ON_WORDS,
               *WITH_WORDS, *TEMPLATES, "a", "an", "of", "shape", "colour", "background", "position", "size"]
    words = []
    for phrase in phrases:
        for word in phrase.replace(",", " ").replace(";", " ").replace(":", " ").replace(".", " ").replace("!", " ").split():
            for part in word.replace("-", " ").split():
                if not part.startswith("{") and not part.endswith("}"):
                    words.append(part.lower())
    return list(dict.fromkeys(words))
