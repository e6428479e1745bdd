"""The built-in model (weights/flux-tiny): it loads like the official repository, and what it draws follows the prompt.

The ground truth is the data set's own renderer (`flux.training.shapes`): the named colours, and masks of every
(shape, position, size) drawn without jitter. A generated picture is read back by nearest named colour and
by the mask it overlaps most — no use of the model's own earlier output.
"""

import importlib.util
import json
import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

import flux
from flux.training import shapes
from flux.training.heldout_captions import heldout_prompts
from flux.cli.main import main
from flux.pipelines.pipeline import Pipeline
from flux.pipelines.snapshots import BUILTIN

pytestmark = pytest.mark.skipif(not (BUILTIN / "model_index.json").is_file(),
                                reason="weights/flux-tiny not built (python weights/build_flux_tiny.py)")

# Full prompts (every attribute named) and short ones (size and position left to the defaults: large, centre).
PROMPTS = [
    shapes.Scene("circle", "red", "blue"),
    shapes.Scene("square", "yellow", "green"),
    shapes.Scene("triangle", "white", "black"),
    shapes.Scene("circle", "blue", "yellow", position="left"),
    shapes.Scene("square", "purple", "white", position="bottom"),
    shapes.Scene("triangle", "orange", "blue", position="top", size="small"),
]
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(BUILTIN, device="cpu")  # bfloat16, as `flux generate` loads it


@pytest.fixture(scope="module")
def generated(pipe):
    """(scene, seed, (H, W, 3) uint8 picture) for every prompt and seed, drawn in one batch at the default size."""
    prompts = [shapes.caption(scene) for scene in PROMPTS]
    images = pipe(prompts, num_images_per_prompt=len(SEEDS), seed=[s for _ in PROMPTS for s in SEEDS],
                  output_type="np", progress=False)
    pictures = (images * 255).round().astype(np.uint8)
    return [(scene, seed, pictures[i * len(SEEDS) + j]) for i, scene in enumerate(PROMPTS) for j, seed in enumerate(SEEDS)]


def test_repository_layout_and_size():
    expected = ["flux1-tiny.safetensors", "ae.safetensors", "model_index.json", "flux_defaults.json",
                "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
                "text_encoder_2/config.json", "text_encoder_2/model.safetensors", "tokenizer/vocab.json",
                "tokenizer/merges.txt", "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json",
                "tokenizer_2/spiece.model", "tokenizer_2/tokenizer.json", "tokenizer_2/tokenizer_config.json",
                "tokenizer_2/special_tokens_map.json"]
    missing = [name for name in expected if not (BUILTIN / name).is_file()]
    assert not missing, f"missing from {BUILTIN}: {missing}"
    size = sum(p.stat().st_size for p in BUILTIN.rglob("*") if p.is_file())
    assert size < 30 * 2**20, f"{BUILTIN} holds {size / 2**20:.1f} MiB, over the 30 MiB budget"


def test_pipeline_reads_the_stated_defaults(pipe):
    stated = json.loads((BUILTIN / "flux_defaults.json").read_text())
    for field, value in stated.items():
        assert getattr(pipe.defaults, field) == value, field
    assert pipe.defaults.guidance is None and not pipe.model.params.guidance_embed  # schnell-style
    assert pipe.model.params.head_dim == 128 and pipe.model.params.axes_dim == (16, 56, 56)
    assert pipe.ae.params.z_channels == 16 and pipe.ae.params.downsampling == 8


def region_colour(picture: np.ndarray, x: float, y: float, half: int) -> str:
    """The named colour nearest to the mean of the (2·half)² pixels around (x, y), given as fractions of the side."""
    side = picture.shape[0]
    column, row = round(x * side), round(y * side)
    patch = picture[max(row - half, 0) : row + half, max(column - half, 0) : column + half].reshape(-1, 3)
    return shapes.nearest_colour(patch.mean(axis=0))


def shape_centre(scene: shapes.Scene) -> tuple[float, float, float]:
    """Where to read a scene's shape colour: (x, y, half side of the patch), fractions of the picture's side.

    Its centroid, which for the upward triangle lies a third of its half-extent below its box's centre (at
    the box's centre a small triangle is only 3 pixels wide), and a patch 0.7 times its half-extent wide."""
    x, y = shapes.POSITIONS[scene.position]
    extent = shapes.SIZES[scene.size]
    return x, y + (extent / 3 if scene.shape == "triangle" else 0), 0.35 * extent


def test_colour_reading_finds_the_renderers_colours():
    """The reading of test_colours_follow_the_prompt, on the data set's own (jittered) pictures."""
    rng = random.Random(1)
    for _ in range(200):
        scene = shapes.random_scene(rng)
        picture = np.asarray(shapes.render(scene, image_size=64, rng=rng))
        x, y, half = shape_centre(scene)
        assert region_colour(picture, x, y, max(1, round(half * 64))) == scene.colour, scene


@pytest.mark.parametrize("index", range(len(PROMPTS) * len(SEEDS)))
def test_colours_follow_the_prompt(generated, index):
    """The shape's colour where the prompt puts the shape, the background's in the four corners."""
    scene, seed, picture = generated[index]
    x, y, half = shape_centre(scene)
    corners = [region_colour(picture, cx, cy, 3) for cx in (0.05, 0.95) for cy in (0.05, 0.95)]
    found = region_colour(picture, x, y, max(1, round(half * picture.shape[0])))
    assert found == scene.colour, f"{shapes.caption(scene)!r} (seed {seed}): {found} where the shape should be"
    assert corners.count(scene.background) >= 3, f"{shapes.caption(scene)!r} (seed {seed}): corners are {corners}"


def scene_masks(background: str, colour: str, size: int) -> dict:
    """Every (shape, position, size) of the data set as a boolean mask, drawn without jitter."""
    masks = {}
    for shape in shapes.SHAPES:
        for position in shapes.POSITIONS:
            for extent in shapes.SIZES:
                scene = shapes.Scene(shape, colour, background, position=position, size=extent)
                picture = np.asarray(shapes.render(scene, image_size=size), dtype=np.float64)
                masks[shape, position, extent] = shape_mask(picture, colour, background)
    return masks


def shape_mask(picture: np.ndarray, colour: str, background: str) -> np.ndarray:
    """Pixels nearer the shape's colour than the background's."""
    distance = {name: np.sum((picture - np.asarray(shapes.COLOURS[name])) ** 2, axis=-1) for name in (colour, background)}
    return distance[colour] < distance[background]


def test_layout_follows_the_prompt(generated):
    """The shape, position and size drawn are those of the prompt, in most pictures: the best-overlapping mask
    (intersection over union) among all 30 the data set can draw is the prompt's."""
    hits, report = 0, []
    for scene, seed, picture in generated:
        mask = shape_mask(picture.astype(np.float64), scene.colour, scene.background)
        scores = {key: (mask & other).sum() / max((mask | other).sum(), 1)
                  for key, other in scene_masks(scene.background, scene.colour, picture.shape[0]).items()}
        best = max(scores, key=scores.get)
        hits += best == (scene.shape, scene.position, scene.size)
        report.append(f"{shapes.caption(scene)!r} seed {seed}: drew {best} (IoU {scores[best]:.2f})")
    assert hits >= 0.75 * len(generated), "\n".join(report)


# Held-out prompts: phrasings the model was not trained on (flux/training/heldout_captions.py), the first eight
# of the evaluation's seed, each with its own fixed seed. weights/evaluate_flux_tiny.py measures 200 of them.
HELD_OUT = heldout_prompts(8, seed=2026)


@pytest.fixture(scope="module")
def generated_held_out(pipe):
    images = pipe([prompt for _, prompt in HELD_OUT], seed=list(range(len(HELD_OUT))), output_type="np", progress=False)
    return [(scene, prompt, (image * 255).round().astype(np.uint8)) for (scene, prompt), image in zip(HELD_OUT, images)]


def test_heldout_prompts_are_followed(generated_held_out):
    """Plain-English prompts in phrasings outside the training captions: the shape's colour at the named
    place and the background in the corners for all (one miss allowed), and the best-overlapping (shape,
    position, size) mask the prompt's for at least six of eight."""
    misses, layout_hits, report = 0, 0, []
    for scene, prompt, picture in generated_held_out:
        x, y, half = shape_centre(scene)
        found = region_colour(picture, x, y, max(1, round(half * picture.shape[0])))
        corners = [region_colour(picture, cx, cy, 3) for cx in (0.05, 0.95) for cy in (0.05, 0.95)]
        colours_right = found == scene.colour and corners.count(scene.background) >= 3
        misses += not colours_right
        mask = shape_mask(picture.astype(np.float64), scene.colour, scene.background)
        scores = {key: (mask & other).sum() / max((mask | other).sum(), 1)
                  for key, other in scene_masks(scene.background, scene.colour, picture.shape[0]).items()}
        best = max(scores, key=scores.get)
        layout_hits += best == (scene.shape, scene.position, scene.size)
        report.append(f"{prompt!r} ({scene}): {found} at the shape, corners {corners}, drew {best}")
    assert misses <= 1 and layout_hits >= 6, "\n".join(report)


def test_evaluation_reads_the_data_sets_own_pictures():
    """weights/evaluate_flux_tiny.py's reader finds every attribute of the renderer's own (jittered) pictures:
    a failure it reports is the model's, not the reader's."""
    path = BUILTIN.parent / "evaluate_flux_tiny.py"
    spec = importlib.util.spec_from_file_location("evaluate_flux_tiny", path)
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    rng = random.Random(0)
    for _ in range(300):
        scene = shapes.random_scene(rng)
        found = evaluate.read_picture(np.asarray(shapes.render(scene, image_size=64, rng=rng)), scene)
        assert all(found.values()), (scene, found)
    wrong = shapes.Scene("circle", "red", "blue", position="left", size="small")  # drawn elsewhere and larger
    found = evaluate.read_picture(np.asarray(shapes.render(shapes.Scene("circle", "red", "blue", position="right"),
                                                           image_size=64)), wrong)
    assert found == dict(colour=False, background=True, position=False, size=False)


def test_generate_without_a_model_uses_the_builtin_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="flux"):
        images = flux.generate("a red circle on a blue background", seed=0, progress=False)
    notices = [r.getMessage() for r in caplog.records if "built-in" in r.getMessage()]
    assert len(notices) == 1, [r.getMessage() for r in caplog.records]
    assert images[0].size == (64, 64)
    picture = np.asarray(images[0])
    assert region_colour(picture, 0.5, 0.5, 6) == "red" and region_colour(picture, 0.05, 0.05, 3) == "blue"


def test_command_line_writes_a_png(tmp_path, caplog):
    path = tmp_path / "out.png"
    with caplog.at_level(logging.INFO, logger="flux"):
        assert main(["generate", "a red circle on a blue background", "-o", str(path), "--seed", "0"]) == 0
    assert any("built-in" in r.getMessage() for r in caplog.records)
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.size == (64, 64)


def test_tokenizer_files_read_by_transformers_as_by_us(pipe):
    """The tokenizer folders are in the official formats: transformers reads them to the same ids."""
    transformers = pytest.importorskip("transformers")
    prompts = ["a small yellow triangle at the right of an orange background", "a beautiful dog, in the rain"]
    clip = transformers.CLIPTokenizer.from_pretrained(BUILTIN / "tokenizer")
    theirs = clip(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(pipe.clip.tokenize(prompts), theirs)
    t5 = transformers.T5TokenizerFast.from_pretrained(BUILTIN / "tokenizer_2")
    length = pipe.defaults.max_sequence_length
    theirs = t5(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(pipe.t5.tokenize(prompts), theirs)


def test_spiece_model_and_tokenizer_json_agree(tmp_path):
    """T5's folder holds the vocabulary twice (as the official one does): either file alone gives the same ids."""
    from flux.weights.tokenizers import T5Tokenizer

    prompts = ["a large purple square at the center of a white background", "an unknown word: zebra"]
    only_spiece = tmp_path / "tokenizer_2"
    only_spiece.mkdir()
    for name in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
        (only_spiece / name).write_bytes((BUILTIN / "tokenizer_2" / name).read_bytes())
    both = T5Tokenizer.from_folder(BUILTIN / "tokenizer_2")(prompts)
    assert torch.equal(T5Tokenizer.from_folder(only_spiece)(prompts), both)
    sentencepiece = pytest.importorskip("sentencepiece")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(only_spiece / "spiece.model"))
    for row, prompt in zip(both, prompts):
        expected = processor.encode(prompt) + [1]  # and </s>
        assert row[: len(expected)].tolist() == expected
