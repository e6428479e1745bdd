"""The pipeline end to end against diffusers' `FluxPipeline` on the same tiny snapshot, and the `flux` command."""

import gc
import logging
import shutil
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from flux import CheckpointError
from flux.cli.main import main
from flux.pipelines.pipeline import Pipeline
from flux.pipelines.snapshots import resolve_snapshot
from flux.pipelines.sampling import pack

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def ours(tiny_snapshot):
    return Pipeline.from_pretrained(tiny_snapshot, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def theirs(tiny_snapshot):
    return diffusers.FluxPipeline.from_pretrained(tiny_snapshot, torch_dtype=torch.float32)


PROMPTS = ["a red circle at the top of a blue background", "a small green triangle on the left"]


@pytest.mark.parametrize("steps, height, width, prompts", [
    (1, 64, 64, PROMPTS[:1]),
    (4, 48, 80, PROMPTS),  # non-square, a batch of two prompts
])
def test_latents_and_images_match_diffusers(ours, theirs, steps, height, width, prompts):
    # The official schnell pipeline gives T5 256 tokens (diffusers defaults to 512, so we say it).
    common = dict(height=height, width=width, num_inference_steps=steps, max_sequence_length=256, guidance_scale=0.0)
    reference = theirs(prompts, generator=torch.Generator("cpu").manual_seed(7), output_type="latent", **common).images
    latents = ours(prompts, height=height, width=width, num_steps=steps, seed=7, output_type="latent", progress=False)
    error = (pack(latents) - reference).abs().max().item()
    assert error <= 1e-4, f"latents differ from diffusers' by {error:.2e}"

    reference = theirs(prompts, generator=torch.Generator("cpu").manual_seed(7), output_type="np", **common).images
    image = ours(prompts, height=height, width=width, num_steps=steps, seed=7, output_type="np", progress=False)
    error = np.abs(image - reference).max()
    assert image.shape == (len(prompts), height, width, 3) and error <= 1e-4, f"images differ by {error:.2e}"


def test_dev_style_snapshot_matches_diffusers(tiny_dev_snapshot):
    ours = Pipeline.from_pretrained(tiny_dev_snapshot, device="cpu", dtype=torch.float32)
    assert ours.defaults.shift_schedule and ours.defaults.num_steps == 50 and ours.defaults.max_sequence_length == 512
    theirs = diffusers.FluxPipeline.from_pretrained(tiny_dev_snapshot, torch_dtype=torch.float32)
    reference = theirs(PROMPTS, height=32, width=48, num_inference_steps=3, guidance_scale=4.0, max_sequence_length=512,
                       generator=torch.Generator("cpu").manual_seed(3), output_type="latent").images
    latents = ours(PROMPTS, height=32, width=48, num_steps=3, guidance=4.0, seed=3, output_type="latent", progress=False)
    error = (pack(latents) - reference).abs().max().item()
    assert error <= 1e-4, f"dev latents differ from diffusers' by {error:.2e}"

    # True classifier-free guidance with a negative prompt, as diffusers' `true_cfg_scale` runs it.
    reference = theirs(PROMPTS, negative_prompt="blurry", true_cfg_scale=3.0, height=32, width=48, num_inference_steps=2,
                       guidance_scale=4.0, max_sequence_length=512, generator=torch.Generator("cpu").manual_seed(3),
                       output_type="latent").images
    latents = ours(PROMPTS, negative_prompt="blurry", true_cfg_scale=3.0, height=32, width=48, num_steps=2, guidance=4.0,
                   seed=3, output_type="latent", progress=False)
    error = (pack(latents) - reference).abs().max().item()
    assert error <= 1e-4, f"true-CFG latents differ from diffusers' by {error:.2e}"


def test_masked_t5_padding_makes_the_result_independent_of_the_padded_length(ours):
    """With `t5_attention_mask`, padding is invisible to T5 and to the joint attention, so padding a prompt to
    16 or to 48 tokens gives the same image; without it (the official behaviour) the padding changes it."""
    def latents(length, mask, **negative):
        return ours("a red circle", height=32, width=32, num_steps=2, seed=4, max_sequence_length=length,
                    t5_attention_mask=mask, output_type="latent", progress=False, **negative)

    # Masked, the padding adds exact zeros to the softmax, but over 16 or 48 keys the attention kernel blocks its
    # fp32 sums differently: rounding of a few ulps on latents of order 1 (below 1e-6 measured).
    torch.testing.assert_close(latents(16, True), latents(48, True), rtol=1e-5, atol=1e-5)
    assert (latents(16, False) - latents(48, False)).abs().max() > 1e-3
    # The negative prompt of true CFG is masked by its own padding, not the prompt's.
    negative = dict(negative_prompt="a blue blue blue square", true_cfg_scale=2.0)
    torch.testing.assert_close(latents(16, True, **negative), latents(48, True, **negative), rtol=1e-5, atol=1e-5)


def test_offload_gives_the_same_image(tiny_snapshot, ours):
    offloaded = Pipeline.from_pretrained(tiny_snapshot, device="cpu", dtype=torch.float32, offload=True)
    a = offloaded("a cat", height=32, width=32, seed=2, num_steps=2, output_type="np", progress=False)
    b = ours("a cat", height=32, width=32, seed=2, num_steps=2, output_type="np", progress=False)
    np.testing.assert_array_equal(a, b)


def mapped_files() -> set[str]:
    """The files this process has memory-mapped (Linux)."""
    with open("/proc/self/maps") as maps:
        return {line.split(maxsplit=5)[5].strip() for line in maps if len(line.split(maxsplit=5)) == 6}


def test_released_text_encoders_are_unmapped_and_read_again(tiny_snapshot, ours, tmp_path):
    snapshot = shutil.copytree(tiny_snapshot, tmp_path / "snapshot")  # files no other pipeline here maps
    pipe = Pipeline.from_pretrained(snapshot, device="cpu", dtype=torch.float32, release_text_encoders=True)
    t5_file = str((snapshot / "text_encoder_2" / "model.safetensors").resolve())
    assert t5_file in mapped_files()  # fp32 on disk and in memory: the weights are views of the file's map
    t5 = weakref.ref(pipe.t5)
    first = pipe("a cat", height=32, width=32, seed=2, num_steps=2, output_type="np", progress=False)
    gc.collect()
    assert pipe.t5 is None and pipe.clip is None and t5() is None
    assert t5_file not in mapped_files()
    second = pipe("a cat", height=32, width=32, seed=2, num_steps=2, output_type="np", progress=False)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, ours("a cat", height=32, width=32, seed=2, num_steps=2, output_type="np", progress=False))


def test_release_needs_a_source(tiny_snapshot, ours):
    with pytest.raises(ValueError, match="release_text_encoders=True needs the folder"):
        Pipeline(model=ours.model, ae=ours.ae, t5=ours.t5, clip=ours.clip, defaults=ours.defaults, release_text_encoders=True)


def test_single_files_and_diffusers_folders_give_the_same_image(tiny_snapshot, tmp_path):
    singles, folders = tmp_path / "singles", tmp_path / "folders"
    shutil.copytree(tiny_snapshot, singles, ignore=shutil.ignore_patterns("transformer", "vae"))
    shutil.copytree(tiny_snapshot, folders, ignore=shutil.ignore_patterns("*.safetensors"), dirs_exist_ok=True)
    for sub in ("text_encoder", "text_encoder_2", "transformer", "vae"):
        shutil.copytree(tiny_snapshot / sub, folders / sub, dirs_exist_ok=True)
    assert not list(folders.glob("*.safetensors")) and not (singles / "transformer").exists()
    a = Pipeline.from_pretrained(singles, device="cpu", dtype=torch.float32)("a cat", height=32, width=32, seed=1, output_type="np", progress=False)
    b = Pipeline.from_pretrained(folders, device="cpu", dtype=torch.float32)("a cat", height=32, width=32, seed=1, output_type="np", progress=False)
    # Bit-identical weights, but laid out differently in memory (diffusers' split projections concatenated into
    # fresh tensors, against views of one file), so oneDNN may block the fp32 sums differently: 1.5e-6 apart on
    # Zen 4, 0 on Cascade Lake. 1e-5 covers tens of fp32 ulps at pixel values ≤ 1 after 4 steps and the decoder.
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_repo_id_resolves_from_the_hugging_face_cache(tiny_snapshot, tmp_path, monkeypatch):
    # The cache's own layout: models--{org}--{name}/refs/main names the snapshot folder.
    repo = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd\n")
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / "0123abcd").symlink_to(tiny_snapshot, target_is_directory=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_snapshot("black-forest-labs/FLUX.1-tiny") == repo / "snapshots" / "0123abcd"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert resolve_snapshot("black-forest-labs/FLUX.1-tiny") == repo / "snapshots" / "0123abcd"


def test_a_missing_local_folder_is_not_taken_for_a_repo_id(tmp_path, monkeypatch):
    (tmp_path / "weights").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        resolve_snapshot("weights/FLUX.1-schnell")


def test_a_repo_missing_from_the_cache_downloads_only_what_is_loaded(tmp_path, monkeypatch):
    """huggingface_hub stands in for the network: the first call asks for the single files and the rest, and
    the diffusers folders are fetched only when the repository turns out to have no single files."""
    import sys
    import types

    calls = []

    def snapshot_download(repo_id, *, allow_patterns, cache_dir):
        calls.append(allow_patterns)
        folder = tmp_path / "downloaded"
        folder.mkdir(exist_ok=True)
        return str(folder)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_snapshot("someone/FLUX.1-folders-only") == tmp_path / "downloaded"
    assert "flux1-*.safetensors" in calls[0] and not any(p.startswith(("transformer", "vae")) for p in calls[0])
    assert len(calls) == 2 and {"transformer/*", "vae/*"} <= set(calls[1])


def test_outputs_seeds_and_metadata(ours):
    images = ours(PROMPTS, height=32, width=48, seed=[11, 12], num_images_per_prompt=1, progress=False)
    assert [im.size for im in images] == [(48, 32)] * 2
    assert images[1].info["prompt"] == PROMPTS[1] and images[1].info["seed"] == "12"
    alone = ours(PROMPTS[1], height=32, width=48, seed=12, output_type="np", progress=False)
    np.testing.assert_allclose(np.asarray(images[1]) / 255, alone[0], atol=1 / 255)
    seen = []
    ours("a dog", height=32, width=32, seed=None, num_steps=2, progress=False, callback=lambda i, t, x: seen.append(i))
    assert seen == [0, 1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(width=100), r"width must be a positive multiple of 16, got 100; the nearest valid size is 96"),
    (dict(height=0), r"height must be a positive multiple of 16"),
    (dict(num_steps=0), r"num_steps must be an integer ≥ 1"),
    (dict(strength=1.5, image=Image.new("RGB", (32, 32))), r"strength must lie in \(0, 1\]"),
    (dict(image=[Image.new("RGB", (32, 32))] * 3), r"got 3 images for 1 prompt"),
    (dict(output_type="jpeg"), r"output_type must be one of"),
])
def test_bad_arguments_fail_before_any_work(ours, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ours("a cat", **{"height": 32, "width": 32, **kwargs})


def test_guidance_on_a_schnell_model_is_ignored_with_a_warning(ours, caplog):
    with caplog.at_level(logging.WARNING, logger="flux"):
        a = ours("a cat", height=32, width=32, seed=0, guidance=7.0, output_type="np", progress=False)
    assert "no guidance embedding" in caplog.text
    np.testing.assert_array_equal(a, ours("a cat", height=32, width=32, seed=0, output_type="np", progress=False))


def test_img2img_starts_from_the_image(ours):
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    out = ours("a cat", height=32, width=32, seed=0, image=image, strength=0.5, num_steps=4, output_type="np", progress=False)
    assert out.shape == (1, 32, 32, 3)


def test_cli_writes_pngs_with_metadata(tiny_snapshot, tmp_path):
    out = tmp_path / "out.png"
    code = main(["generate", "a red circle", "--model", str(tiny_snapshot), "-o", str(out), "--width", "48",
                 "--height", "32", "--seed", "5", "--num-images", "2", "--dtype", "fp32", "--quiet"])
    assert code == 0
    for i in range(2):  # image i has seed 5 + i (flux.pipelines.requests.image_seeds)
        picture = Image.open(tmp_path / f"out_{i}.png")
        assert picture.size == (48, 32) and picture.text["prompt"] == "a red circle" and picture.text["seed"] == str(5 + i)


@pytest.mark.parametrize("args, message", [
    (["--width", "100"], "nearest valid size is 96"),
    (["--model", "/nowhere/at/all"], "not found"),
    (["--steps", "0"], "num_steps must be"),
    (["--strength", "2", "--image", "PNG"], "strength must lie in (0, 1]"),
    (["--image", "/nowhere/x.png"], "file not found"),
    (["--image", __file__], "not an image"),
    (["--num-images", "0"], "num_images_per_prompt must be"),
])
def test_cli_user_errors_exit_with_2_and_one_line(tiny_snapshot, tmp_path, capsys, args, message):
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    args = [str(tmp_path / "in.png") if arg == "PNG" else arg for arg in args]
    argv = ["generate", "a cat", "--model", str(tiny_snapshot), "-o", str(tmp_path / "x.png"), "--quiet",
            "--width", "32", "--height", "32", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_missing_model_says_where_the_weights_come_from(tmp_path, capsys):
    assert main(["generate", "a cat", "--model", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.png"), "--quiet"]) == 2
    assert "weights/README.md" in capsys.readouterr().err


def test_pipeline_loads_and_unloads_a_lora(ours, tmp_path):
    """Pipeline.load_lora is flux.weights.lora.load_lora on its transformer (tested against diffusers in test_lora.py)."""
    from flux.weights.lora import add_lora, save_lora, unload_lora

    before = ours("a cat", height=32, width=32, seed=3, num_steps=2, output_type="latent", progress=False)
    for parameter in add_lora(ours.model, rank=4):
        torch.nn.init.normal_(parameter, std=0.05)
    save_lora(ours.model, tmp_path / "lora.safetensors", format="kohya")
    unload_lora(ours.model)
    changed = ours.load_lora(tmp_path / "lora.safetensors", strength=0.8)
    assert changed and all(name.startswith(("double_blocks", "single_blocks")) for name in changed)
    with_lora = ours("a cat", height=32, width=32, seed=3, num_steps=2, output_type="latent", progress=False)
    ours.unload_lora()
    after = ours("a cat", height=32, width=32, seed=3, num_steps=2, output_type="latent", progress=False)
    assert (with_lora - before).abs().max() > 1e-3
    assert torch.equal(after, before)
