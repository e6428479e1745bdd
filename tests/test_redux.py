"""FLUX.1 Redux and precomputed text embeddings against diffusers' `FluxPriorReduxPipeline` + `FluxPipeline`.

The reference runs as diffusers' documentation shows: the Redux pipeline turns an image (and a prompt) into
`prompt_embeds` and `pooled_prompt_embeds`, which `FluxPipeline` takes instead of a prompt. Both the tiny
Redux snapshot (SigLIP, embedder, preprocessing settings) and the tiny FLUX snapshot are made by the reference
libraries with random weights (tests/snapshots.py); the same seed must give the same latents and images.
"""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import flux
from flux import CheckpointError
from flux.cli.main import main
from flux.modules.redux import Redux, ReduxEmbedderConfig, ReduxImageEmbedder
from flux.modules.siglip import TINY as SIGLIP, SiglipVisionModel
from flux.pipelines.pipeline import Pipeline
from flux.pipelines.sampling import pack

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red circle at the top of a blue background", "a small green triangle on the left"]
T5_TOKENS = 512  # diffusers' FluxPriorReduxPipeline always encodes (or zero-fills) 512 T5 tokens
COMMON = dict(height=32, width=48, seed=7)  # 2 × 3 latent patches: a non-square image


def picture(seed: int, size=(90, 61), mode="RGB") -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).convert(mode)


@pytest.fixture(scope="module")
def ours(tiny_snapshot):
    return Pipeline.from_pretrained(tiny_snapshot, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def redux(tiny_redux):
    return flux.load_redux(tiny_redux[0], device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def theirs(tiny_snapshot, tiny_redux):
    """(FluxPipeline, FluxPriorReduxPipeline with the FLUX snapshot's text encoders)."""
    base = diffusers.FluxPipeline.from_pretrained(tiny_snapshot, torch_dtype=torch.float32)
    return base, with_text_encoders(tiny_redux[1], base)


def with_text_encoders(prior, base):
    """The Redux pipeline with the FLUX pipeline's T5 and CLIP, so that it encodes the prompt."""
    return diffusers.FluxPriorReduxPipeline(
        image_encoder=prior.image_encoder, feature_extractor=prior.feature_extractor, image_embedder=prior.image_embedder,
        text_encoder=base.text_encoder, tokenizer=base.tokenizer, text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2)


def reference_embeds(prior, image, prompt, *, scale=1.0, pooled_scale=1.0):
    """diffusers' Redux output for one image. Without a prompt it uses zero T5 tokens (512) and a zero pooled
    vector; its code writes them 4096 and 768 wide, the official widths, so we hand it zeros of the tiny widths,
    which is the same computation."""
    if prompt is None:
        width, pooled_width = prior.image_embedder.redux_down.out_features, prior.text_encoder.config.hidden_size
        zeros = dict(prompt_embeds=torch.zeros(1, T5_TOKENS, width), pooled_prompt_embeds=torch.zeros(1, pooled_width))
        out = prior(image=image, prompt_embeds_scale=scale, pooled_prompt_embeds_scale=pooled_scale, **zeros)
    else:
        out = prior(image=image, prompt=prompt, prompt_embeds_scale=scale, pooled_prompt_embeds_scale=pooled_scale)
    return out.prompt_embeds, out.pooled_prompt_embeds


def reference_run(base, prompt_embeds, pooled, *, steps, output_type):
    return base(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, height=COMMON["height"], width=COMMON["width"],
                num_inference_steps=steps, guidance_scale=0.0, generator=torch.Generator("cpu").manual_seed(COMMON["seed"]),
                output_type=output_type).images


@pytest.mark.parametrize("with_prompt", [True, False], ids=["with-prompt", "without-prompt"])
def test_one_image_per_prompt_matches_diffusers(ours, theirs, redux, with_prompt):
    base, prior = theirs
    images = [picture(1), picture(2, size=(40, 130), mode="RGBA")]
    prompts = PROMPTS if with_prompt else [None, None]
    # diffusers sums a list of images into one embedding, so each (prompt, image) pair is its own call.
    embeds = [reference_embeds(prior, image, prompt) for image, prompt in zip(images, prompts)]
    prompt_embeds, pooled = (torch.cat(parts) for parts in zip(*embeds))
    assert prompt_embeds.shape == (2, T5_TOKENS + SIGLIP.num_patches, 48)

    kwargs = dict(redux_image=[[images[0]], [images[1]]], redux=redux, max_sequence_length=T5_TOKENS, num_steps=2,
                  progress=False, **COMMON)
    prompt = PROMPTS if with_prompt else None
    # fp32 on both sides; the transformer's kernels see the same inputs up to RoPE (diffusers in float64, ours in
    # float32, ~1e-6 apart, manifests/README.md): 1e-4 covers that after 2 steps and the decoder.
    latents = ours(prompt, output_type="latent", **kwargs)
    error = (pack(latents) - reference_run(base, prompt_embeds, pooled, steps=2, output_type="latent")).abs().max().item()
    assert error <= 1e-4, f"latents differ from diffusers' by {error:.2e}"
    if not with_prompt:  # the decoder sees the latents alone: once is enough
        return
    pixels = ours(prompt, output_type="np", **kwargs)
    error = np.abs(pixels - reference_run(base, prompt_embeds, pooled, steps=2, output_type="np")).max()
    assert pixels.shape == (2, 32, 48, 3) and error <= 1e-4, f"images differ from diffusers' by {error:.2e}"


def test_a_dev_pipeline_matches_diffusers(tiny_dev_snapshot, tiny_redux, redux):
    """FLUX.1-Redux-dev's own base: guidance-distilled, shifted schedule."""
    base = diffusers.FluxPipeline.from_pretrained(tiny_dev_snapshot, torch_dtype=torch.float32)
    prior = with_text_encoders(tiny_redux[1], base)
    ours = Pipeline.from_pretrained(tiny_dev_snapshot, device="cpu", dtype=torch.float32)
    image = picture(10)
    prompt_embeds, pooled = reference_embeds(prior, image, PROMPTS[0])
    reference = base(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, height=32, width=48, num_inference_steps=2,
                     guidance_scale=3.5, generator=torch.Generator("cpu").manual_seed(7), output_type="latent").images
    latents = ours(PROMPTS[0], redux_image=image, redux=redux, guidance=3.5, max_sequence_length=T5_TOKENS, num_steps=2,
                   output_type="latent", progress=False, **COMMON)
    error = (pack(latents) - reference).abs().max().item()
    assert error <= 1e-4, f"dev latents differ from diffusers' by {error:.2e}"  # as above


def test_scales_and_a_shared_image_match_diffusers(ours, theirs, redux):
    base, prior = theirs
    image = picture(3)
    embeds = [reference_embeds(prior, image, prompt, scale=s, pooled_scale=p)
              for prompt, s, p in zip(PROMPTS, (0.7, 1.2), (1.5, 0.4))]
    prompt_embeds, pooled = (torch.cat(parts) for parts in zip(*embeds))
    latents = ours(PROMPTS, redux_image=image, redux=redux, prompt_embeds_scale=[0.7, 1.2],
                   pooled_prompt_embeds_scale=[1.5, 0.4], max_sequence_length=T5_TOKENS, num_steps=2,
                   output_type="latent", progress=False, **COMMON)
    error = (pack(latents) - reference_run(base, prompt_embeds, pooled, steps=2, output_type="latent")).abs().max().item()
    assert error <= 1e-4, f"scaled latents differ from diffusers' by {error:.2e}"  # as above


def test_several_images_per_prompt_are_concatenated_in_order(ours, theirs, redux):
    """Ours appends each image's tokens, first image first (diffusers would sum them). The reference tokens are
    diffusers' own: the prompt's T5 tokens with the first image's, then the second image's alone (an empty text)."""
    base, prior = theirs
    first, second = picture(4), picture(5, size=(200, 80))
    with_first, pooled = reference_embeds(prior, first, PROMPTS[0])
    only_second = prior(image=second, prompt_embeds=torch.zeros(1, 0, 48), pooled_prompt_embeds=torch.zeros(1, 40)).prompt_embeds
    prompt_embeds = torch.cat([with_first, only_second], dim=1)
    assert prompt_embeds.shape[1] == T5_TOKENS + 2 * SIGLIP.num_patches
    latents = ours(PROMPTS[0], redux_image=[first, second], redux=redux, max_sequence_length=T5_TOKENS, num_steps=2,
                   output_type="latent", progress=False, **COMMON)
    error = (pack(latents) - reference_run(base, prompt_embeds, pooled, steps=2, output_type="latent")).abs().max().item()
    assert error <= 1e-4, f"latents differ from diffusers' by {error:.2e}"  # as above
    swapped = ours(PROMPTS[0], redux_image=[second, first], redux=redux, max_sequence_length=T5_TOKENS, num_steps=2,
                   output_type="latent", progress=False, **COMMON)
    assert (swapped - latents).abs().max() > 0  # text tokens carry no position, but attention sums in order


def test_prompt_embeds_path_is_the_prompt_path_bit_for_bit(ours, redux):
    prompt_embeds, pooled = ours.encode_prompt(PROMPTS, max_sequence_length=64)
    assert prompt_embeds.shape == (2, 64, 48) and pooled.shape == (2, 40)
    for extra in ({}, dict(redux_image=picture(6), redux=redux)):
        common = dict(max_sequence_length=64, num_steps=2, num_images_per_prompt=2, output_type="latent",
                      progress=False, **COMMON, **extra)
        from_prompt = ours(PROMPTS, **common)
        # The same tensors reach the same kernels in the same order: equal, not close.
        assert torch.equal(ours(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, **common), from_prompt)


def test_both_embedder_layouts_and_the_single_file_load_the_same(tiny_redux, redux, tmp_path):
    root = tiny_redux[0]
    diffusers_only = shutil.copytree(root, tmp_path / "diffusers", ignore=shutil.ignore_patterns("flux1-redux-dev.safetensors"))
    bfl_only = shutil.copytree(root, tmp_path / "bfl", ignore=shutil.ignore_patterns("image_embedder"))
    image = picture(7)
    expected = redux(image)
    assert expected.shape == (1, SIGLIP.num_patches, 48)
    for path in (diffusers_only, bfl_only, bfl_only / "flux1-redux-dev.safetensors"):
        # The same fp32 weights, but as views of two files' memory maps at different alignments, which BLAS may
        # block differently (MKL's "conditional numerical reproducibility"): equal up to fp32 rounding.
        tokens = flux.load_redux(path, device="cpu", dtype=torch.float32)(image)
        torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{path}: {m}")
    # The reference's own tokens, from its preprocessing, SigLIP and embedder: the same kernels, ~1e-7 apart.
    prior = tiny_redux[1]
    reference = prior.image_embedder(prior.encode_image(image, "cpu", 1)).image_embeds
    torch.testing.assert_close(expected, reference, rtol=0, atol=1e-5)
    assert redux.preprocess([image, image]).shape == (2, 3, SIGLIP.image_size, SIGLIP.image_size)
    assert redux.image_encoder(redux.preprocess(image)).shape == (1, SIGLIP.num_patches, SIGLIP.hidden_size)


def test_a_repo_id_resolves_from_the_hugging_face_cache(tiny_redux, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-Redux-dev"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc\n")
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / "abc").symlink_to(tiny_redux[0], target_is_directory=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert flux.load_redux("black-forest-labs/FLUX.1-Redux-dev", device="cpu", dtype=torch.float32).token_width == 48


@pytest.mark.parametrize("removed, message", [
    ("image_encoder", "no image_encoder/ folder; FLUX.1 Redux needs the SigLIP image encoder"),
    ("feature_extractor", "no feature_extractor/ folder; FLUX.1 Redux needs the image preprocessing settings"),
    ("embedder", "no Redux embedder here: expected flux1-redux-dev.safetensors or an image_embedder/ folder"),
])
def test_missing_parts_are_named(tiny_redux, tmp_path, removed, message):
    copy = shutil.copytree(tiny_redux[0], tmp_path / "redux")
    for path in ([copy / "flux1-redux-dev.safetensors", copy / "image_embedder"] if removed == "embedder" else [copy / removed]):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(CheckpointError, match=message):
        flux.load_redux(copy, device="cpu")


def test_an_embedder_for_another_encoder_is_refused(tiny_redux, tmp_path):
    from safetensors.torch import save_file

    copy = shutil.copytree(tiny_redux[0], tmp_path / "redux")
    save_file({"redux_up.weight": torch.zeros(144, 32), "redux_up.bias": torch.zeros(144),
               "redux_down.weight": torch.zeros(48, 144), "redux_down.bias": torch.zeros(48)},
              copy / "flux1-redux-dev.safetensors")
    with pytest.raises(CheckpointError, match="takes 32-wide states, but .* gives SigLIP hidden_size 64"):
        flux.load_redux(copy, device="cpu")


def other_width_redux() -> Redux:
    """A Redux whose tokens are 32 wide (this transformer's text is 48): shapes only, it never runs."""
    with torch.device("meta"):
        return Redux(SiglipVisionModel(SIGLIP), ReduxImageEmbedder(ReduxEmbedderConfig(SIGLIP.hidden_size, 32)), None)


@pytest.mark.parametrize("kwargs, message", [
    (dict(redux_image=Image.new("RGB", (8, 8))), r"redux_image needs redux=, a Redux model from flux.load_redux"),
    (dict(redux_image=Image.new("RGB", (8, 8)), redux=other_width_redux()),
     r"redux: its tokens are 32 wide, but this transformer's text width \(context_in_dim\) is 48"),
    (dict(redux="REDUX"), r"redux= is given without redux_image="),
    (dict(redux_image="photo.png", redux="REDUX"), r"redux_image must be a PIL image, a list of PIL images"),
    (dict(redux_image=[[Image.new("RGB", (8, 8))]] * 3, redux="REDUX"), r"got 3 lists of images for 1 prompt"),
    (dict(prompt=PROMPTS, redux_image=[[Image.new("RGB", (8, 8))], [Image.new("RGB", (8, 8))] * 2], redux="REDUX"),
     r"every prompt needs the same number of images"),
    (dict(prompt=None), r"or give prompt_embeds and pooled_prompt_embeds, or redux_image with redux="),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 4, 48)), r"prompt_embeds and pooled_prompt_embeds go together"),
    (dict(prompt_embeds=torch.zeros(1, 4, 48), pooled_prompt_embeds=torch.zeros(1, 40)), r"give prompt or prompt_embeds"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 4, 4096), pooled_prompt_embeds=torch.zeros(1, 40)),
     r"prompt_embeds must be \(B, T, 48\) \(T5's states; this transformer's text width is 48\), got \(1, 4, 4096\)"),
    (dict(prompt=None, prompt_embeds=torch.zeros(4, 48), pooled_prompt_embeds=torch.zeros(1, 40)),
     r"prompt_embeds must be \(B, T, 48\)"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 4, 48), pooled_prompt_embeds=torch.zeros(1, 768)),
     r"pooled_prompt_embeds must be \(B, 40\) \(CLIP's pooled vector\), got \(1, 768\)"),
    (dict(prompt=None, prompt_embeds=torch.zeros(2, 4, 48), pooled_prompt_embeds=torch.zeros(1, 40)),
     r"prompt_embeds has 2 rows and pooled_prompt_embeds 1"),
    (dict(prompt=None, prompt_embeds=torch.full((1, 4, 48), float("nan")), pooled_prompt_embeds=torch.zeros(1, 40)),
     r"prompt_embeds holds NaN or infinite values"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 4, 48, dtype=torch.long), pooled_prompt_embeds=torch.zeros(1, 40)),
     r"prompt_embeds must be a floating-point tensor"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 4, 48), pooled_prompt_embeds=torch.zeros(1, 40), t5_attention_mask=True),
     r"t5_attention_mask needs the prompt"),
    (dict(prompt_embeds_scale=[1.0, 2.0]), r"prompt_embeds_scale must be a finite number or a list of 1 \(one per prompt\)"),
    (dict(pooled_prompt_embeds_scale=float("inf")), r"pooled_prompt_embeds_scale must be a finite number"),
])
def test_bad_text_arguments_fail_before_any_work(ours, redux, kwargs, message):
    kwargs = {"prompt": "a cat", **kwargs}
    kwargs = {key: redux if value == "REDUX" else value for key, value in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        ours(height=32, width=32, **kwargs)


def test_cli_takes_redux_images(tiny_snapshot, tiny_redux, tmp_path, ours, redux):
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    picture(8).save(first)
    picture(9).save(second)
    out = tmp_path / "out.png"
    code = main(["generate", "a red circle", "--model", str(tiny_snapshot), "--redux", str(tiny_redux[0]),
                 "--redux-image", str(first), "--redux-image", str(second), "-o", str(out), "--width", "48",
                 "--height", "32", "--seed", "5", "--steps", "1", "--dtype", "fp32", "--quiet"])
    assert code == 0
    expected = ours("a red circle", redux_image=[Image.open(first), Image.open(second)], redux=redux, height=32, width=48,
                    seed=5, num_steps=1, progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))


@pytest.mark.parametrize("args, message", [
    (["--redux-image", "PNG"], "--redux FOLDER and --redux-image PATH go together"),
    (["--redux", "REDUX"], "--redux FOLDER and --redux-image PATH go together"),
    (["--redux", "REDUX", "--redux-image", "/nowhere/x.png"], "--redux-image /nowhere/x.png: file not found"),
    (["--redux", "/nowhere/redux", "--redux-image", "PNG"], "/nowhere/redux: not found"),
])
def test_cli_redux_errors_exit_with_2_and_one_line(tiny_snapshot, tiny_redux, tmp_path, capsys, args, message):
    picture(8).save(tmp_path / "in.png")
    args = [str(tmp_path / "in.png") if a == "PNG" else str(tiny_redux[0]) if a == "REDUX" else a for a in args]
    assert main(["generate", "a cat", "--model", str(tiny_snapshot), "-o", str(tmp_path / "x.png"), "--quiet",
                 "--width", "32", "--height", "32", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
