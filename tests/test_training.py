"""Training: the objective against diffusers' FLUX training recipe, the timestep samplers against diffusers'
helpers, and the loop by its invariants: it overfits four images (full and LoRA), a resumed run repeats the
uninterrupted one exactly, and two processes under torchrun (FSDP2 and DDP, Gloo on the CPU) end where one
process with the same global batch ends.

The loop tests train a micro model (one block of each kind, width 128) written into a copy of the tiny
snapshot: on a CPU a step of the tiny model costs several times more and teaches nothing more.

Run as a script, this file is the worker that `torchrun` starts for the distributed test.
"""

import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import flux.training.checkpoints
import flux.training.command
import flux.training.config
import flux.training.data
import flux.training.loop
import flux.training.objective
from flux.modules.configs import TINY
from flux.weights.loading import load_autoencoder, load_clip, load_flow_model, load_t5
from flux.modules.transformer import Flux
from flux.training.command import parser
from flux.training.config import TrainConfig, config_from
from flux.training.data import DataOrder
from flux.training.loop import train
from flux.training.data import (
    bucket_sizes, build_cache, image_size, load_cache, load_image, nearest_bucket, read_folder, save_cache,
)
from flux.training.objective import rectified_flow_loss, sample_timesteps

MICRO = replace(TINY, hidden_size=128, num_heads=1, depth=1, depth_single_blocks=1)
CAPTIONS = ("a red circle", "a blue square on the left", "a green triangle at the top", "a yellow cat in the sky")


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The micro model's operations are too small to gain from threads; on a shared CPU two threads
    mostly wait for each other (a step takes 5–10× longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def micro_snapshot(source: Path, folder: Path, *, dev: bool) -> Path:
    """The tiny snapshot's encoders, tokenizers and autoencoder, with a micro transformer (PyTorch's default
    initialisation, seeded) as its flux1-*.safetensors."""
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("transformer", "flux1-*"))
    torch.manual_seed(0)
    model = Flux(replace(MICRO, guidance_embed=dev))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / f"flux1-{'dev' if dev else 'schnell'}.safetensors")
    return folder


@pytest.fixture(scope="module")
def micro(tiny_snapshot, tmp_path_factory):
    return micro_snapshot(tiny_snapshot, tmp_path_factory.mktemp("micro") / "snapshot", dev=False)


@pytest.fixture(scope="module")
def micro_dev(tiny_snapshot, tmp_path_factory):
    """Dev-style (a guidance embedding), which the loader reads off the weights."""
    return micro_snapshot(tiny_snapshot, tmp_path_factory.mktemp("micro-dev") / "snapshot", dev=True)


def write_images(folder: Path, sizes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index, ((width, height), caption) in enumerate(zip(sizes, CAPTIONS)):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"image{index}.png")
        (folder / f"image{index}.txt").write_text(caption + "\n")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four 32×32 images with captions."""
    return write_images(tmp_path_factory.mktemp("images"), [(32, 32)] * 4)


def config(snapshot, data, output, **changes) -> TrainConfig:
    """The tests' settings: 32-pixel buckets, 16 T5 tokens, fp32 throughout, quiet."""
    settings = dict(model=str(snapshot), data=str(data), output=str(output), resolution=32, bucket_step=16,
                    max_sequence_length=16, batch_size=4, mixed_precision="no", save_every=1000, progress=False)
    return TrainConfig(**settings | changes)


# --------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dev", [False, True], ids=["schnell", "dev"])
def test_loss_matches_the_diffusers_training_recipe(dev, tmp_path):
    """diffusers' examples/dreambooth/train_dreambooth_flux.py, written out with its transformer: noisy input
    (1 − σ)·x0 + σ·ε, target ε − x0, the transformer called on packed latents with timestep σ (it scales by
    1000 itself), guidance as a (B,) tensor; the loss is the mean squared error."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    reference = FluxTransformer2DModel(
        patch_size=1, in_channels=TINY.in_channels, num_layers=TINY.depth, num_single_layers=TINY.depth_single_blocks,
        attention_head_dim=TINY.head_dim, num_attention_heads=TINY.num_heads, joint_attention_dim=TINY.context_in_dim,
        pooled_projection_dim=TINY.vec_in_dim, guidance_embeds=dev, axes_dims_rope=TINY.axes_dim).eval()
    with torch.no_grad():  # random everywhere: no zero-initialised layer may hide a path
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference.save_pretrained(tmp_path)
    ours = load_flow_model(tmp_path, dtype=torch.float32)  # through the (separately tested) diffusers conversion
    generator = torch.Generator().manual_seed(0)
    batch, height, width, length = 3, 6, 4, 5  # latent pixels: 3×2 tokens
    x0, noise = torch.randn(2, batch, 16, height, width, generator=generator)
    txt = torch.randn(batch, length, TINY.context_in_dim, generator=generator)
    vec = torch.randn(batch, TINY.vec_in_dim, generator=generator)
    sigmas = torch.rand(batch, generator=generator)
    guidance = 3.5 if dev else None

    with torch.no_grad():
        s = sigmas[:, None, None, None]
        noisy = FluxPipeline._pack_latents((1 - s) * x0 + s * noise, batch, 16, height, width)
        prediction = reference(hidden_states=noisy, timestep=sigmas, guidance=torch.full((batch,), 3.5) if dev else None,
                               pooled_projections=vec, encoder_hidden_states=txt, txt_ids=torch.zeros(length, 3),
                               img_ids=FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", torch.float32),
                               return_dict=False)[0]
        expected = torch.mean((prediction - FluxPipeline._pack_latents(noise - x0, batch, 16, height, width)) ** 2)
        loss = rectified_flow_loss(ours, x0, txt, vec, sigmas, noise=noise, guidance=guidance)
    assert torch.allclose(loss, expected, rtol=1e-5, atol=0), f"ours {loss.item()}, diffusers' recipe {expected.item()}"


def test_timestep_samplers_match_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.training_utils import compute_density_for_timestep_sampling

    ours = sample_timesteps(64, method="logit_normal", mean=0.3, std=1.2, generator=torch.Generator().manual_seed(1))
    theirs = compute_density_for_timestep_sampling("logit_normal", 64, logit_mean=0.3, logit_std=1.2,
                                                   generator=torch.Generator().manual_seed(1))
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-7), (ours - theirs).abs().max()

    # FLUX's shift: the dev scheduler's exponential time shift with mu from the image's token count.
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    for tokens in (64, 1024, 4096):
        shifted = sample_timesteps(64, method="shifted", image_tokens=tokens, generator=torch.Generator().manual_seed(2))
        plain = sample_timesteps(64, method="logit_normal", generator=torch.Generator().manual_seed(2))
        expected = scheduler.time_shift(calculate_shift(tokens), 1.0, plain)
        assert torch.allclose(shifted, expected, rtol=1e-6, atol=1e-7), (shifted - expected).abs().max()

    uniform = sample_timesteps(20_000, method="uniform", generator=torch.Generator().manual_seed(3))
    assert 0 <= uniform.min() and uniform.max() < 1 and abs(uniform.mean().item() - 0.5) < 0.01
    with pytest.raises(ValueError, match="needs image_tokens"):
        sample_timesteps(2, method="shifted")


def tiny_model_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Flux(TINY)
    return model, dict(latents=torch.randn(2, 16, 4, 6, generator=generator),
                       txt=torch.randn(2, 7, TINY.context_in_dim, generator=generator),
                       vec=torch.randn(2, TINY.vec_in_dim, generator=generator), t=torch.rand(2, generator=generator),
                       noise=torch.randn(2, 16, 4, 6, generator=generator))


def loss_and_gradients(model, inputs):
    model.zero_grad()
    loss = rectified_flow_loss(model, inputs["latents"], inputs["txt"], inputs["vec"], inputs["t"], noise=inputs["noise"])
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_gradient_checkpointing_gives_the_same_gradients():
    model, inputs = tiny_model_inputs()
    loss, gradients = loss_and_gradients(model, inputs)
    model.gradient_checkpointing = True
    loss_checkpointed, gradients_checkpointed = loss_and_gradients(model, inputs)
    assert torch.equal(loss, loss_checkpointed)
    worst = max((gradients[n] - gradients_checkpointed[n]).abs().max().item() for n in gradients)
    assert worst <= 1e-6, f"max gradient difference {worst}"  # the same operations recomputed: equal up to rounding


def test_the_loss_runs_under_bf16_autocast():
    model, inputs = tiny_model_inputs()
    loss, gradients = loss_and_gradients(model, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf16, gradients_bf16 = loss_and_gradients(model, inputs)
    assert loss_bf16.dtype == torch.float32 and all(g.dtype == torch.float32 for g in gradients_bf16.values())
    # bf16 keeps 8 bits of mantissa: the loss within a few percent, the gradient pointing the same way.
    assert abs(loss_bf16 - loss) / loss < 0.03, (loss.item(), loss_bf16.item())
    flat, flat_bf16 = (torch.cat([g.flatten() for g in grads.values()]) for grads in (gradients, gradients_bf16))
    assert torch.cosine_similarity(flat, flat_bf16, dim=0) > 0.99


# --------------------------------------------------------------------------------------------------
# Data and caching
# --------------------------------------------------------------------------------------------------

def test_buckets():
    # Worked by hand: for each width (multiples of 64), the tallest multiple of 64 with width·height ≤ 512²,
    # kept if the aspect ratio is within 2:1.
    assert bucket_sizes(512, step=64) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    for width, height in bucket_sizes(1024, step=16, max_aspect=3):
        assert width % 16 == 0 and height % 16 == 0 and width * height <= 1024**2 and 1 / 3 <= width / height <= 3
    buckets = bucket_sizes(512, step=64)
    assert nearest_bucket(1000, 600, buckets) == (640, 384)
    assert nearest_bucket(600, 1000, buckets) == (384, 640)
    assert nearest_bucket(300, 310, buckets) == (512, 512)
    with pytest.raises(ValueError, match="multiple of 16"):
        bucket_sizes(512, step=40)


def test_load_image_covers_then_crops_the_centre(tmp_path):
    # 60×20, left and right fifths black, the middle white: scaled ×1.6 to 96×32, the centre 32×32 is white.
    array = np.zeros((20, 60, 3), dtype=np.uint8)
    array[:, 12:48] = 255
    Image.fromarray(array).save(tmp_path / "wide.png")
    pixels = load_image(tmp_path / "wide.png", 32, 32)
    assert pixels.shape == (3, 32, 32)
    assert pixels[:, :, 4:28].min() > 0.95 and pixels.min() >= -1 and pixels.max() <= 1
    # A camera's portrait photo: stored 60×20 with EXIF orientation 6, shown turned a quarter, 20×60.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(array).save(tmp_path / "turned.jpg", exif=exif)
    assert image_size(tmp_path / "turned.jpg") == (20, 60) and image_size(tmp_path / "wide.png") == (60, 20)
    assert load_image(tmp_path / "turned.jpg", 16, 48)[:, 10:38].min() > 0.9  # the white band, now across the middle


def test_read_folder(tmp_path):
    write_images(tmp_path, [(16, 16)] * 2)
    examples = read_folder(tmp_path)
    assert [e.image.name for e in examples] == ["image0.png", "image1.png"]
    assert [e.caption for e in examples] == list(CAPTIONS[:2])  # the trailing newline stripped
    (tmp_path / "image1.txt").unlink()
    with pytest.raises(ValueError, match="without a caption file.*image1.png"):
        read_folder(tmp_path)


def test_cache_holds_what_the_encoders_give(tiny_snapshot, tmp_path):
    data = write_images(tmp_path / "data", [(32, 32), (48, 32), (32, 32)])
    examples, sizes = read_folder(data), [(32, 32), (48, 32), (32, 32)]
    ae, t5, clip = (load(tiny_snapshot, dtype=torch.float32) for load in (load_autoencoder, load_t5, load_clip))
    cache = build_cache(examples, sizes, ae=ae, t5=t5, clip=clip, extra_texts=("a sample prompt",), batch_size=2)
    with torch.no_grad():
        # allclose: the cache encodes in batches, and the summation order of a convolution or matmul may depend
        # on the batch (and the CPU's kernels): fp32 rounding, a few ulps on values of order 1.
        assert torch.allclose(cache.latents[1], ae.encode(load_image(examples[1].image, 48, 32)[None])[0], rtol=1e-5,
                              atol=1e-5)
        txt, vec = cache.text([2, 0])
        assert torch.allclose(txt, t5([CAPTIONS[2], CAPTIONS[0]]), rtol=1e-5, atol=1e-5)
        assert torch.allclose(vec, clip([CAPTIONS[2], CAPTIONS[0]]), rtol=1e-5, atol=1e-5)
        assert torch.allclose(cache.prompts(["a sample prompt"])[1], clip(["a sample prompt"]), rtol=1e-5, atol=1e-5)
    save_cache(cache, tmp_path / "cache.safetensors", fingerprint="v1")
    assert load_cache(tmp_path / "cache.safetensors", fingerprint="v2") is None
    loaded = load_cache(tmp_path / "cache.safetensors", fingerprint="v1")
    assert loaded.captions == cache.captions and all(torch.equal(a, b) for a, b in zip(loaded.latents, cache.latents))
    assert all(torch.equal(loaded.embeddings[k][1], v[1]) for k, v in cache.embeddings.items())


def test_data_order_covers_each_epoch_and_depends_only_on_seed_and_step():
    sizes = [(4, 4)] * 5 + [(4, 6)] * 2  # buckets of 5 and 2 examples, global batch 2
    order = DataOrder(sizes, 2, seed=7)
    assert order.steps_per_epoch == 3 + 1
    epoch = [order.batch(step) for step in range(4)]
    for batch in epoch:
        assert len(batch) == 2 and len({sizes[i] for i in batch}) == 1
    seen = sorted(i for batch in epoch for i in batch)
    assert set(seen) == set(range(7)) and len(seen) == 8  # every example, one of the five twice (padding)
    assert [DataOrder(sizes, 2, seed=7).batch(step) for step in range(4, 8)] == [order.batch(step) for step in range(4, 8)]
    assert [order.batch(step) for step in range(4, 8)] != epoch  # the next epoch is shuffled anew


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------

def evaluation_loss(model, output: Path, *, draws: int = 8) -> float:
    """The loss on the four cached images with fixed noise and times, `draws` of each per image."""
    cache = load_cache(output / "cache.safetensors", fingerprint=None)
    generator = torch.Generator().manual_seed(1234)
    latents = torch.stack(cache.latents).repeat(draws, 1, 1, 1)
    txt, vec = cache.text(list(range(len(cache.latents))) * draws)
    noise = torch.randn(latents.shape, generator=generator)
    t = sample_timesteps(len(latents), image_tokens=latents[0, 0].numel() // 4, generator=generator)
    with torch.no_grad():
        return rectified_flow_loss(model, latents, txt, vec, t, noise=noise).item()


# The random tiny autoencoder gives latents of std 0.14, so the task is mostly to predict ε from x_t: the
# output must scale like 1/t, which the time-dependent modulation and final layer provide. Full fine-tuning
# changes those; a LoRA on the attention and MLP projections alone learns this slowly, so here it adapts
# every Linear. Batches of 8 hold each image twice (two noise draws).
@pytest.mark.parametrize("settings", [dict(steps=80, learning_rate=2e-3),
                                      dict(steps=140, learning_rate=6e-3, lora_rank=32, lora_targets=("*",))],
                         ids=["full", "lora"])
def test_overfits_four_images(settings, micro, images, tmp_path):
    result = train(config(micro, images, tmp_path, batch_size=8, **settings))
    start = evaluation_loss(load_flow_model(micro, dtype=torch.float32), tmp_path)
    end = evaluation_loss(result.model, tmp_path)
    assert end < 0.1 * start, f"evaluation loss {start:.4f} -> {end:.4f} ({end / start:.3f} of the start)"
    assert np.mean(result.losses[-10:]) < 0.2 * np.mean(result.losses[:5]), result.losses


@pytest.mark.parametrize("settings", [dict(), dict(lora_rank=4, lora_dropout=0.1, warmup_steps=3)], ids=["full", "lora"])
def test_resume_repeats_the_uninterrupted_run(settings, micro, images, tmp_path):
    common = dict(steps=6, save_every=3, learning_rate=1e-3, batch_size=2) | settings
    whole = train(config(micro, images, tmp_path / "whole", **common))
    resumed = train(config(micro, images, tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-000003"), **common))
    assert resumed.losses == whole.losses[3:], (whole.losses, resumed.losses)  # exactly, on the CPU
    for name in ("model.safetensors", "training_state.safetensors"):
        if (tmp_path / "whole" / "checkpoint-000006" / name).exists():
            ends = [load_file(tmp_path / run / "checkpoint-000006" / name) for run in ("whole", "resumed")]
            assert ends[0].keys() == ends[1].keys() and all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])


def test_command_line_lora_run_on_a_dev_model(micro_dev, tmp_path):
    """`flux train` with a TOML file and flags: a LoRA checkpoint that load_lora reads, a sample image, and
    `--resume latest` continuing it."""
    from flux.cli.main import main
    from flux.weights.lora import load_lora

    data = write_images(tmp_path / "data", [(32, 32), (32, 32), (48, 32)])
    (tmp_path / "train.toml").write_text(
        f'model = "{micro_dev}"\ndata = "{data}"\nresolution = 32\nbucket-step = 16\nmax_sequence_length = 16\n'
        'lora_rank = 4\nlora_format = "kohya"\nmixed_precision = "no"\nsample_prompts = ["a red circle"]\n')
    flags = ["train", "--config", str(tmp_path / "train.toml"), "--output", str(tmp_path / "run"), "--save-every", "2",
             "--sample-every", "2", "--sample-steps", "2", "--batch-size", "2", "--quiet"]
    assert main([*flags, "--steps", "2"]) == 0
    checkpoint = tmp_path / "run" / "checkpoint-000002"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["lora.safetensors", "trainer.json", "training_state.safetensors"]
    assert json.loads((checkpoint / "trainer.json").read_text())["step"] == 2
    assert Image.open(tmp_path / "run" / "samples" / "step-000002-0.png").size == (32, 32)
    model = load_flow_model(micro_dev, dtype=torch.float32)
    assert len(load_lora(model, checkpoint / "lora.safetensors")) == 10  # 8 double-block + 2 single-block Linears

    assert main([*flags, "--steps", "4", "--resume", "latest"]) == 0
    assert json.loads((tmp_path / "run" / "checkpoint-000004" / "trainer.json").read_text())["step"] == 4
    assert main(["train", "--model", str(micro_dev), "--output", str(tmp_path)]) == 2  # no --data
    with pytest.raises(ValueError, match="unknown setting"):
        config_from({"model": "m", "data": "d", "output": "o", "learning_rat": 1})


def test_the_training_page_shows_the_command_as_it_is():
    """docs/training.md: every flag of `flux train` in its table and no other, its command lines and TOML
    example valid settings (parsed and checked, not run: they name FLUX.1-dev), and every public function and
    class of flux/training/ named."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "training.md").read_text(encoding="utf-8")
    flags = {name for action in parser()._actions for name in action.option_strings if name not in ("-h", "--help")}
    table = page[page.index("| flag | default | meaning |"):]
    table = table[: table.index("\n\n")]
    documented = {name for row in re.findall(r"^\| (`[^|]+) \|", table, re.MULTILINE) for name in re.findall(r"`([^`]+)`", row)}
    assert documented == flags, f"undocumented {sorted(flags - documented)}, no longer there {sorted(documented - flags)}"

    blocks = re.findall(r"^```(\w+)\n(.*?)^```", page, re.MULTILINE | re.DOTALL)
    commands = [line for language, block in blocks if language == "sh"
                for line in re.sub(r"\\\n\s*", " ", block).splitlines() if "flux train" in line or "flux.training" in line]
    assert len(commands) == 3
    for command in commands:
        words = shlex.split(command.split("#")[0])
        arguments = vars(parser().parse_args(words[words.index("flux.training" if "flux.training" in words else "train") + 1:]))
        if "config" not in arguments:
            config_from(arguments)
    (toml,) = [block for language, block in blocks if language == "toml"]
    config_from(tomllib.loads(toml) | {"steps": 2000})
    for module in (flux.training.objective, flux.training.data, flux.training.config, flux.training.checkpoints,
                   flux.training.command, flux.training.loop):
        public = [name for name, value in vars(module).items() if not name.startswith("_") and
                  (inspect.isfunction(value) or inspect.isclass(value)) and value.__module__ == module.__name__]
        assert all(f"`{name}`" in page for name in public), [name for name in public if f"`{name}`" not in page]


# --------------------------------------------------------------------------------------------------
# Two processes
# --------------------------------------------------------------------------------------------------

# (name, strategy, settings): full fine-tuning under FSDP2 (with gradient checkpointing) and DDP, and a LoRA
# under FSDP2. Three steps at batch 2 per rank; the single process runs them at batch 4.
DISTRIBUTED_RUNS = [("fsdp", "fsdp", dict(gradient_checkpointing=True)), ("ddp", "ddp", dict()),
                    ("fsdp-lora", "fsdp", dict(lora_rank=4))]


def distributed_config(snapshot, data, output, strategy, settings, batch_size):
    return config(snapshot, data, output, steps=3, learning_rate=1e-3, batch_size=batch_size, distributed=strategy,
                  save_every=3, **settings)


def worker(snapshot: str, data: str, output: str) -> None:
    """Under torchrun: each run, then this rank's whole trained tensors into `{name}-rank{rank}.safetensors`."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for name, strategy, settings in DISTRIBUTED_RUNS:
        result = train(distributed_config(snapshot, data, Path(output) / name, strategy, settings, batch_size=2))
        options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)  # gathered on every rank
        weights = get_model_state_dict(result.model, options=options)
        save_file({k: v.contiguous() for k, v in weights.items()}, Path(output) / f"{name}-rank{rank}.safetensors")
        (Path(output) / f"{name}-rank{rank}.json").write_text(json.dumps(result.losses))
    dist.destroy_process_group()


def test_two_processes_match_one(micro, images, tmp_path):
    repository = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(repository), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "--worker", str(micro), str(images), str(tmp_path / "distributed")]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]

    for name, strategy, settings in DISTRIBUTED_RUNS:
        single = train(distributed_config(micro, images, tmp_path / "single" / name, strategy, settings, batch_size=4))
        reference = {k: v for k, v in single.model.state_dict().items() if k in dict(single.model.named_parameters())
                     and dict(single.model.named_parameters())[k].requires_grad}
        ranks = [load_file(tmp_path / "distributed" / f"{name}-rank{rank}.safetensors") for rank in (0, 1)]
        assert ranks[0].keys() == ranks[1].keys() == reference.keys()
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in reference), f"{name}: the ranks disagree"
        # Each rank computes the loss of half the batch and the gradients are averaged over the two: the same
        # sums in another order, equal up to float32 rounding. But AdamW divides each gradient by its own RMS,
        # so where a gradient is a near-cancelling sum its rounding error becomes a fraction of a step; in
        # three steps of lr = 1e-3 (weights move up to 3e-3) we measured up to 6e-6. The bound, 3e-5 (1% of
        # the distance moved), fails on any real difference: a rank training on other samples, or a gradient
        # not averaged over the ranks (the ranks then disagree), changes updates by about lr.
        worst = max((ranks[0][k] - reference[k]).abs().max().item() for k in reference)
        assert worst < 3e-5, f"{name}: max weight difference to one process {worst:.2e}"
        losses = json.loads((tmp_path / "distributed" / f"{name}-rank0.json").read_text())
        assert np.allclose(losses, single.losses, rtol=1e-5), (losses, single.losses)
        # Rank 0's checkpoint holds the gathered tensors; under FSDP2 the LoRA file is written from the shards.
        checkpoint, single_checkpoint = (tmp_path / run / name / "checkpoint-000003" for run in ("distributed", "single"))
        if settings.get("lora_rank"):
            saved = {k.removeprefix("lora."): v for k, v in load_file(checkpoint / "training_state.safetensors").items()
                     if k.startswith("lora.")}
            files = [load_file(folder / "lora.safetensors") for folder in (checkpoint, single_checkpoint)]
            assert files[0].keys() == files[1].keys()
            assert all(torch.allclose(files[0][k], files[1][k], rtol=0, atol=3e-5) for k in files[0])
        else:
            saved = load_file(checkpoint / "model.safetensors")
        assert all(torch.equal(saved[k], ranks[0][k]) for k in reference)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(*sys.argv[2:5])
