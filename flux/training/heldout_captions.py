"""Held-out evaluation prompts for the built-in model (weights/flux-tiny): phrasings it was NOT trained on.

The training captions come from `flux.training.captions`. Everything here is kept apart from them on purpose:
the sentence templates, the synonyms for sizes, shapes, positions and the background, the fillers before
and after, are all different (tests/test_captions.py checks that no template, synonym or filler phrase of
this file is one of the training ones, and that the training captions never contain this file's own words).
The build also keeps these words out of the noise words it scatters through the training captions. What the
two share is what a prompt cannot do without: the eight colour names, the three shape names and the words
left, right, top, bottom, centre/center, small, large.

`heldout_prompts` is what weights/evaluate_flux_tiny.py measures (the accuracy table in weights/README.md)
and what tests/test_builtin.py samples a few of.
"""

import random

from flux.training.shapes import DEFAULT_POSITION, DEFAULT_SIZE, Scene, article, random_scene

SHAPE_WORDS = {
    "circle": ("circle", "circle figure", "circle form"),
    "square": ("square", "square figure", "square form"),
    "triangle": ("triangle", "triangle figure", "triangle form"),
}
SIZE_WORDS = {
    "small": ("small", "smallish", "very small", "quite small"),
    "large": ("large", "larger", "very large", "rather large", "largish"),
}
BACKGROUND_WORDS = ("canvas", "field", "surface", "wall", "setting", "scenery")
POSITION_PHRASES = {
    "left": ("towards the left", "far left", "along the left", "at the far left", "leftward"),
    "right": ("towards the right", "far right", "along the right", "at the far right", "rightward"),
    "top": ("towards the top", "in the top part", "along the top", "at the very top", "top-most"),
    "bottom": ("towards the bottom", "in the bottom part", "along the bottom", "at the very bottom", "bottom-most"),
    "centre": ("in the dead centre", "at the very center", "in the exact centre", "centrally", "at the centre point"),
}
PREFIXES = ("could you sketch", "kindly produce", "my request:", "here's an idea:", "i'd love to see",
            "depict")
SUFFIXES = (", thanks", " :)", ", in a plain style", ", sharp edges", " - keep it plain")

TEMPLATES = (
    "there is {shape} {position}, and the {background_noun} is {background_colour}",
    "{background_colour} {background_noun} featuring {shape} {position}",
    "{shape} sitting {position} against {background}",
    "{position_first} sits {shape}, upon {background}",
    "i'd like {background}; put {shape} {position}",
    "{shape} placed {position}, {background_colour} all around",
    "{background_colour} {background_noun}. {shape} {position}.",
)
# The words a held-out prompt shares with the training captions: the names and the commonest function words.
SHARED_WORDS = frozenset({"red", "orange", "yellow", "green", "blue", "purple", "white", "black", "circle", "square",
                          "triangle", "left", "right", "top", "bottom", "centre", "center", "small", "large",
                          "a", "an", "the", "in", "at", "and", "is", "to", "i"})


def heldout_prompts(count: int, *, seed: int) -> list[tuple[Scene, str]]:
    """`count` (scene, prompt) pairs from `seed`: random scenes, each in one held-out phrasing."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        scene = random_scene(rng)
        pairs.append((scene, heldout_prompt(scene, rng)))
    return pairs


def heldout_prompt(scene: Scene, rng: random.Random) -> str:
    """One held-out phrasing of `scene`; size and position are left out only when they are the defaults."""
    with_size = scene.size != DEFAULT_SIZE or rng.random() < 0.5
    with_position = scene.position != DEFAULT_POSITION or rng.random() < 0.5
    shape = " ".join(filter(None, (rng.choice(SIZE_WORDS[scene.size]) if with_size else "", scene.colour,
                                   rng.choice(SHAPE_WORDS[scene.shape]))))
    shape = f"{article(shape)} {shape}"
    background_noun = rng.choice(BACKGROUND_WORDS)
    background = f"{article(scene.background)} {scene.background} {background_noun}"
    position = rng.choice(POSITION_PHRASES[scene.position]) if with_position else ""
    template = rng.choice(TEMPLATES)
    if "{position_first}" in template and not position:
        template = "{shape} sitting {position} against {background}"
    text = template.format(shape=shape, background=background, position=position, background_noun=background_noun,
                           background_colour=scene.background, position_first=position[:1].upper() + position[1:])
    prefix = rng.choice(PREFIXES) if rng.random() < 0.4 else ""  # fillers on some prompts, not all
    text = " ".join(filter(None, (prefix, text))) + (rng.choice(SUFFIXES) if rng.random() < 0.4 else "")
    text = " ".join(text.split()).replace(" ,", ",")
    style = rng.random()  # lower case, a capital first letter, or capitals throughout
    return text if style < 0.5 else text[:1].upper() + text[1:] if style < 0.85 else text.upper()


def vocabulary() -> list[str]:
    """Every word a held-out prompt can use besides the colour names, lower case (kept out of training)."""
    phrases = [*(w for words in SHAPE_WORDS.values() for w in words), *(w for words in SIZE_WORDS.values() for w in words),
               *BACKGROUND_WORDS, *(p for phrases in POSITION_PHRASES.values() for p in phrases), *PREFIXES,
               *SUFFIXES, *TEMPLATES, "a", "an"]
    words = []
    for phrase in phrases:
        for word in phrase.replace(",", " ").replace(";", " ").replace(".", " ").replace(":", " ").split():
            for part in word.replace("-", " ").replace("'", " ").split():
                if not part.startswith("{") and part.isalpha():
                    words.append(part.lower())
    return list(dict.fromkeys(words))
