"""The training captions (flux.training.captions) and the held-out prompts (flux.training.heldout_captions):
each says its scene, and the two share no template, synonym, filler or word beyond the names a prompt needs."""

import random
import re

import pytest

from flux.training import captions, heldout_captions, shapes


def scenes(count: int, seed: int) -> list[shapes.Scene]:
    rng = random.Random(seed)
    return [shapes.random_scene(rng) for _ in range(count)]


@pytest.mark.parametrize("seed", range(3))
def test_captions_name_the_scene(seed):
    """Every caption names the shape's and the background's colours, and a size or position word when the
    scene's is not the default (the ground truth a caption leaves out is the default)."""
    rng = random.Random(seed)
    for scene in scenes(300, seed):
        noisy = captions.describe(scene, rng, noise_words=["zebra", "lamp"]).lower()
        assert {scene.colour, scene.background} <= set(re.findall(r"[a-z]+", noisy)), noisy
        text = captions.describe(scene, rng).lower()  # noise words may fall inside a phrase: checked without
        if scene.size != shapes.DEFAULT_SIZE:
            assert any(word in text for word in captions.SIZE_WORDS[scene.size]), text
        if scene.position != shapes.DEFAULT_POSITION:
            assert any(phrase in text for phrase in captions.POSITION_PHRASES[scene.position]), text


def test_captions_are_seeded_and_varied():
    one = [captions.describe(scene, random.Random(7)) for scene in scenes(50, 0)]
    assert one == [captions.describe(scene, random.Random(7)) for scene in scenes(50, 0)]
    rng = random.Random(1)
    scene = shapes.Scene("circle", "red", "blue", position="left", size="small")
    assert len({captions.describe(scene, rng) for _ in range(200)}) > 150


def test_heldout_prompts_name_the_scene():
    for scene, prompt in heldout_captions.heldout_prompts(300, seed=0):
        words = set(re.findall(r"[a-z]+", prompt.lower()))
        assert {scene.colour, scene.background} <= words, prompt
        if scene.position != shapes.DEFAULT_POSITION:
            assert any(p in prompt.lower() for p in heldout_captions.POSITION_PHRASES[scene.position]), prompt


def test_heldout_phrasings_are_disjoint_from_the_training_ones():
    """No held-out template, synonym or filler is a training one, and the only words the two sets share are
    the names (colours, shapes, positions, sizes) and a few function words (`SHARED_WORDS`)."""
    for held_out, trained in (
        (heldout_captions.TEMPLATES, captions.TEMPLATES), (heldout_captions.PREFIXES, captions.PREFIXES),
        (heldout_captions.SUFFIXES, captions.SUFFIXES), (heldout_captions.BACKGROUND_WORDS, captions.BACKGROUND_WORDS),
    ):
        assert not set(held_out) & set(trained)
    for table, trained_table in ((heldout_captions.SHAPE_WORDS, captions.SHAPE_WORDS),
                                 (heldout_captions.SIZE_WORDS, captions.SIZE_WORDS),
                                 (heldout_captions.POSITION_PHRASES, captions.POSITION_PHRASES)):
        for key, phrases in table.items():
            shared = set(phrases) & set(trained_table[key])
            assert shared <= heldout_captions.SHARED_WORDS, (key, shared)  # only the bare names
    shared_words = set(heldout_captions.vocabulary()) & set(captions.vocabulary())
    assert shared_words <= heldout_captions.SHARED_WORDS, sorted(shared_words - heldout_captions.SHARED_WORDS)


def test_training_captions_never_contain_a_heldout_word():
    """Generated captions (noise words aside: the build draws those from outside both sets) use only the
    training vocabulary, so no held-out word reaches training."""
    rng = random.Random(3)
    held_out = set(heldout_captions.vocabulary()) - heldout_captions.SHARED_WORDS
    for scene in scenes(500, 3):
        words = set(re.findall(r"[a-z]+", captions.describe(scene, rng).lower()))
        assert not words & held_out, words & held_out
