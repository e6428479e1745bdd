"""The FLUX.1 family (flux/pipelines/variants.py) against diffusers' pipelines on tiny random checkpoints:
Fill (`FluxFillPipeline`), Canny/Depth (`FluxControlPipeline`), Kontext (`FluxKontextPipeline`), and the control
LoRA (`FluxControlPipeline` + `load_lora_weights` on the base dev model).

Same weights, same seed: fp32 latents and images within 1e-4. The tiny models (flux.modules.configs.TINY, the real
head dim and rotary axes) run a few steps at non-square sizes; the pipelines differ only in the order of fp32
sums (diffusers' split q/k/v projections against our fused ones, its attention processor against ours), about
1e-6 after the decoder, so 1e-4 leaves two orders of magnitude for the kernels' rounding on any CPU.

diffusers' Fill and Control pipelines encode their images with a sample of the autoencoder's posterior, drawn
from the call's generator (Kontext takes the mode); ours, as the issue and the official sampler's intent have
it, use the posterior mean. Here diffusers' sample is the mean (`posterior_mean` below), so that both run the
same maths and the generator draws only the initial noise, as ours does.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from flux.pipelines.pipeline import Pipeline
from flux.pipelines.sampling import pack
from snapshots import bfl_control_lora

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red circle at the top of a blue background", "a small green triangle on the left"]
# Latents and pixels after a few fp32 steps and the decoder: see the module docstring.
TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def posterior_mean(monkeypatch):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def picture(width, height, seed, mode="RGB"):
    """A random picture with some structure (smooth gradients and noise), so that resizing matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    pixels = (base + rng.uniform(0, 55, size=(height, width, 3))).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def mask(width, height, box, mode="L"):
    """White (repaint) inside `box` = (left, top, right, bottom), black elsewhere."""
    pixels = np.zeros((height, width), dtype=np.uint8)
    left, top, right, bottom = box
    pixels[top:bottom, left:right] = 255
    return Image.fromarray(pixels).convert(mode)


def compare(ours, theirs, prompts, *, ours_kwargs, theirs_kwargs, seed=7):
    """Latents and np images of both pipelines for the same request; returns the two max errors."""
    reference = theirs(prompt=prompts, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
                       **theirs_kwargs).images
    latents = ours(prompts, seed=seed, output_type="latent", progress=False, **ours_kwargs)
    latent_error = (pack(latents) - reference).abs().max().item()
    reference = theirs(prompt=prompts, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                       **theirs_kwargs).images
    image = ours(prompts, seed=seed, output_type="np", progress=False, **ours_kwargs)
    assert image.shape == reference.shape, (image.shape, reference.shape)
    image_error = float(np.abs(image - reference).max())
    print(f"max abs error: latents {latent_error:.2e}, images {image_error:.2e}")  # shown with pytest -s
    return latent_error, image_error


# --------------------------------------------------------------------------------------------------
# Fill
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fill(tiny_fill_snapshot):
    return Pipeline.from_pretrained(tiny_fill_snapshot, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def fill_reference(tiny_fill_snapshot):
    return diffusers.FluxFillPipeline.from_pretrained(tiny_fill_snapshot, torch_dtype=torch.float32)


@pytest.mark.parametrize("case", [
    # one prompt, image and mask of the output's size; an RGB mask
    dict(prompts=PROMPTS[:1], width=48, height=32, image=(48, 32), mask=(48, 32), box=(8, 4, 30, 20), mode="RGB"),
    # batch 2, image and mask of other sizes than the output (resized to it), strength < 1
    dict(prompts=PROMPTS, width=32, height=64, image=(40, 72), mask=(20, 36), box=(2, 10, 15, 30), mode="L",
         strength=0.75),
])
def test_fill_matches_diffusers(fill, fill_reference, case):
    assert fill.variant == "fill" and fill.defaults.guidance == 30.0 and fill.defaults.num_steps == 50
    image, mask_image = picture(*case["image"], seed=1), mask(*case["mask"], case["box"], case["mode"])
    common = dict(width=case["width"], height=case["height"], image=image, mask_image=mask_image)
    strength = case.get("strength")
    latent_error, image_error = compare(
        fill, fill_reference, case["prompts"],
        ours_kwargs=dict(**common, num_steps=4, guidance=30.0, **({"strength": strength} if strength else {})),
        theirs_kwargs=dict(**common, num_inference_steps=4, guidance_scale=30.0, strength=strength or 1.0,
                           max_sequence_length=512))
    assert latent_error <= TOLERANCE, f"Fill latents differ from diffusers' by {latent_error:.2e}"
    assert image_error <= TOLERANCE, f"Fill images differ from diffusers' by {image_error:.2e}"


def test_fill_output_defaults_to_the_image_size(fill):
    out = fill("a cat", image=picture(50, 37, seed=2), mask_image=mask(50, 37, (0, 0, 20, 20)), num_steps=1,
               output_type="np", progress=False)
    assert out.shape == (1, 32, 48, 3)  # 50×37 rounded down to multiples of 16


# --------------------------------------------------------------------------------------------------
# Control (a full Canny/Depth model)
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def canny(tiny_canny_snapshot):
    return Pipeline.from_pretrained(tiny_canny_snapshot, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def canny_reference(tiny_canny_snapshot):
    return diffusers.FluxControlPipeline.from_pretrained(tiny_canny_snapshot, torch_dtype=torch.float32)


@pytest.mark.parametrize("prompts, width, height, control", [
    (PROMPTS[:1], 64, 32, (64, 32)),
    (PROMPTS, 32, 48, (45, 70)),  # batch 2, a control image of another size
])
def test_control_matches_diffusers(canny, canny_reference, prompts, width, height, control):
    assert canny.variant == "control" and canny.defaults.guidance == 30.0
    common = dict(width=width, height=height, control_image=picture(*control, seed=3))
    latent_error, image_error = compare(canny, canny_reference, prompts,
                                        ours_kwargs=dict(**common, num_steps=3, guidance=30.0),
                                        theirs_kwargs=dict(**common, num_inference_steps=3, guidance_scale=30.0,
                                                           max_sequence_length=512))
    assert latent_error <= TOLERANCE, f"control latents differ from diffusers' by {latent_error:.2e}"
    assert image_error <= TOLERANCE, f"control images differ from diffusers' by {image_error:.2e}"


# --------------------------------------------------------------------------------------------------
# Kontext
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kontext(tiny_kontext_snapshot):
    return Pipeline.from_pretrained(tiny_kontext_snapshot, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def kontext_reference(tiny_kontext_snapshot):
    return diffusers.FluxKontextPipeline.from_pretrained(tiny_kontext_snapshot, torch_dtype=torch.float32)


@pytest.mark.parametrize("prompts, width, height, reference", [
    (PROMPTS[:1], 48, 32, (40, 56)),  # a reference of another size and aspect than the output
    (PROMPTS, 32, 64, (64, 48)),  # batch 2
])
def test_kontext_matches_diffusers(kontext, kontext_reference, prompts, width, height, reference):
    assert kontext.variant == "kontext" and kontext.defaults.guidance == 2.5 and kontext.defaults.num_steps == 28
    image = picture(*reference, seed=4)
    # diffusers rescales the output to `max_area` pixels (1024² by default) at the asked aspect ratio: the
    # output's own area keeps it as asked.
    latent_error, image_error = compare(
        kontext, kontext_reference, prompts,
        ours_kwargs=dict(width=width, height=height, image=image, auto_resize=False, num_steps=3, guidance=2.5),
        theirs_kwargs=dict(width=width, height=height, image=image, _auto_resize=False, max_area=width * height,
                           num_inference_steps=3, guidance_scale=2.5, max_sequence_length=512))
    assert latent_error <= TOLERANCE, f"Kontext latents differ from diffusers' by {latent_error:.2e}"
    assert image_error <= TOLERANCE, f"Kontext images differ from diffusers' by {image_error:.2e}"


# --------------------------------------------------------------------------------------------------
# The control LoRA on the base dev model
# --------------------------------------------------------------------------------------------------

def to_diffusers_layout(tensors, *, depth, single, hidden):
    """The same LoRA under diffusers' names (what diffusers' _convert_bfl_flux_control_lora_to_diffusers makes of
    the official file, which is written for 19 + 38 blocks of width 3072 only): fused projections split by rows,
    A copied to each part; the final modulation's (shift, scale) halves swapped to diffusers' (scale, shift)."""
    modules = {"img_in": ["x_embedder"], "txt_in": ["context_embedder"],
               "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
               "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
               "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
               "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
               "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
               "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
               "final_layer.linear": ["proj_out"], "final_layer.adaLN_modulation.1": ["norm_out.linear"]}
    norms = {}
    for i in range(depth):
        d, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        modules |= {f"{d}.img_mod.lin": [f"{t}.norm1.linear"], f"{d}.txt_mod.lin": [f"{t}.norm1_context.linear"],
                    f"{d}.img_attn.qkv": [f"{t}.attn.to_{x}" for x in "qkv"],
                    f"{d}.txt_attn.qkv": [f"{t}.attn.add_{x}_proj" for x in "qkv"],
                    f"{d}.img_attn.proj": [f"{t}.attn.to_out.0"], f"{d}.txt_attn.proj": [f"{t}.attn.to_add_out"],
                    f"{d}.img_mlp.0": [f"{t}.ff.net.0.proj"], f"{d}.img_mlp.2": [f"{t}.ff.net.2"],
                    f"{d}.txt_mlp.0": [f"{t}.ff_context.net.0.proj"], f"{d}.txt_mlp.2": [f"{t}.ff_context.net.2"]}
        norms |= {f"{d}.img_attn.norm.query_norm.scale": f"{t}.attn.norm_q.weight",
                  f"{d}.img_attn.norm.key_norm.scale": f"{t}.attn.norm_k.weight",
                  f"{d}.txt_attn.norm.query_norm.scale": f"{t}.attn.norm_added_q.weight",
                  f"{d}.txt_attn.norm.key_norm.scale": f"{t}.attn.norm_added_k.weight"}
    for i in range(single):
        s, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        modules |= {f"{s}.modulation.lin": [f"{t}.norm.linear"], f"{s}.linear2": [f"{t}.proj_out"],
                    f"{s}.linear1": [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v", f"{t}.proj_mlp"]}
        norms |= {f"{s}.norm.query_norm.scale": f"{t}.attn.norm_q.weight", f"{s}.norm.key_norm.scale": f"{t}.attn.norm_k.weight"}
    converted = {}
    for ours, theirs in modules.items():
        A, B, bias = (tensors[f"{ours}.lora_{x}"] for x in ("A.weight", "B.weight", "B.bias"))
        if ours == "final_layer.adaLN_modulation.1":
            B, bias = torch.cat(B.chunk(2)[::-1]), torch.cat(bias.chunk(2)[::-1])
        sizes = [hidden] * (len(theirs) - 1) + [B.shape[0] - hidden * (len(theirs) - 1)]
        for name, B_part, bias_part in zip(theirs, B.split(sizes), bias.split(sizes)):
            converted |= {f"transformer.{name}.lora_A.weight": A, f"transformer.{name}.lora_B.weight": B_part,
                          f"transformer.{name}.lora_B.bias": bias_part}
    converted |= {f"transformer.{theirs}": tensors[ours] for ours, theirs in norms.items()}
    assert 3 * len(modules) + len(norms) == len(tensors), "the conversion must use every tensor of the file"
    return {name: tensor.clone() for name, tensor in converted.items()}  # A copied, not shared


@pytest.fixture(scope="module")
def dev(tiny_dev_snapshot):
    return Pipeline.from_pretrained(tiny_dev_snapshot, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def control_lora_files(dev, tmp_path_factory):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("control-lora")
    tensors = bfl_control_lora(dev.model, folder / "flux1-canny-dev-lora.safetensors")
    p = dev.model.params
    save_file(to_diffusers_layout(tensors, depth=p.depth, single=p.depth_single_blocks, hidden=p.hidden_size),
              str(folder / "canny-lora-diffusers.safetensors"))
    return folder / "flux1-canny-dev-lora.safetensors", folder / "canny-lora-diffusers.safetensors"


def test_control_lora_matches_diffusers_and_unloads(dev, tiny_dev_snapshot, control_lora_files):
    bfl_file, diffusers_file = control_lora_files
    before = dev("a cat", width=32, height=48, num_steps=2, seed=3, output_type="latent", progress=False)
    img_in = dev.model.img_in.weight
    reference = diffusers.FluxControlPipeline.from_pretrained(tiny_dev_snapshot, torch_dtype=torch.float32)
    reference.load_lora_weights(diffusers_file)
    assert reference.transformer.x_embedder.in_features == 128  # diffusers widened it too
    changed = dev.load_lora(bfl_file)
    try:
        assert dev.variant == "control" and dev.model.img_in.in_features == 128 and "img_in" in changed
        common = dict(width=48, height=32, control_image=picture(40, 40, seed=5))
        latent_error, image_error = compare(dev, reference, PROMPTS,
                                            ours_kwargs=dict(**common, num_steps=3, guidance=30.0),
                                            theirs_kwargs=dict(**common, num_inference_steps=3, guidance_scale=30.0,
                                                               max_sequence_length=512))
        assert latent_error <= TOLERANCE, f"control-LoRA latents differ from diffusers' by {latent_error:.2e}"
        assert image_error <= TOLERANCE, f"control-LoRA images differ from diffusers' by {image_error:.2e}"
        with_bfl = dev("a cat", num_steps=2, seed=4, output_type="latent", progress=False, **common)
    finally:
        dev.unload_lora()
    assert dev.variant == "text-to-image" and dev.model.img_in.weight is img_in and dev.model.params.in_channels == 64
    assert torch.equal(dev("a cat", width=32, height=48, num_steps=2, seed=3, output_type="latent", progress=False), before)

    # The diffusers-layout file is the same LoRA: the same output, to the order of the fused sums.
    dev.load_lora(diffusers_file)
    try:
        with_diffusers = dev("a cat", num_steps=2, seed=4, output_type="latent", progress=False, **common)
    finally:
        dev.unload_lora()
    error = (with_bfl - with_diffusers).abs().max().item()
    assert error <= 1e-5, f"the two layouts of one control LoRA differ by {error:.2e}"


# --------------------------------------------------------------------------------------------------
# Loading: the variant read off either layout; a contradicting variant= refused
# --------------------------------------------------------------------------------------------------

def one_layout(snapshot, folder, layout):
    """A copy of `snapshot` with its transformer and autoencoder in one layout only: "bfl" (flux1-*.safetensors
    and ae.safetensors) or "diffusers" (transformer/ and vae/)."""
    import shutil

    ignore = ("transformer", "vae") if layout == "bfl" else ("*.safetensors",)
    shutil.copytree(snapshot, folder, ignore=shutil.ignore_patterns(*ignore))
    if layout == "diffusers":
        for sub in ("text_encoder", "text_encoder_2", "transformer", "vae"):
            shutil.copytree(snapshot / sub, folder / sub, dirs_exist_ok=True)
    return folder


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_the_variant_is_read_off_either_layout(tiny_fill_snapshot, tiny_canny_snapshot, tiny_kontext_snapshot,
                                               tiny_dev_snapshot, layout, tmp_path):
    expected = {"fill": (tiny_fill_snapshot, 30.0), "control": (tiny_canny_snapshot, 30.0),
                "kontext": (tiny_kontext_snapshot, 2.5), "text-to-image": (tiny_dev_snapshot, 3.5)}
    for variant, (snapshot, guidance) in expected.items():
        pipe = Pipeline.from_pretrained(one_layout(snapshot, tmp_path / variant, layout), device="cpu", dtype=torch.float32)
        assert (pipe.variant, pipe.defaults.guidance) == (variant, guidance), (layout, variant)


def test_kontext_is_known_by_its_file_name_and_depth_by_its_defaults(tiny_kontext_snapshot, tiny_canny_snapshot, tmp_path):
    import json
    import shutil

    # Without model_index.json's FluxKontextPipeline, the single file's name says Kontext.
    folder = one_layout(tiny_kontext_snapshot, tmp_path / "kontext", "bfl")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    assert Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32).variant == "kontext"
    # A Kontext file under another name is declared one; dev-shaped files may be.
    (folder / "flux1-kontext-dev.safetensors").rename(folder / "flux1-dev.safetensors")
    assert Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32).variant == "text-to-image"
    pipe = Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32, variant="kontext")
    assert pipe.variant == "kontext" and pipe.defaults.guidance == 2.5 and pipe.defaults.num_steps == 28
    # Depth shares Canny's shapes: its name gives it depth's guidance.
    depth = one_layout(tiny_canny_snapshot, tmp_path / "depth", "bfl")
    shutil.move(depth / "flux1-canny-dev.safetensors", depth / "flux1-depth-dev.safetensors")
    assert Pipeline.from_pretrained(depth, device="cpu", dtype=torch.float32).defaults.guidance == 10.0


@pytest.mark.parametrize("variant, message", [
    ("kontext", r"variant='kontext', but .* is a fill checkpoint \(img_in takes 384 input channels\)"),
    ("text-to-image", r"variant='text-to-image', but .* is a fill checkpoint"),
    ("inpaint", r"variant must be one of \('text-to-image', 'fill', 'control', 'kontext'\) or None"),
])
def test_a_variant_that_contradicts_the_checkpoint_is_refused(tiny_fill_snapshot, variant, message):
    with pytest.raises(ValueError, match=message):
        Pipeline.from_pretrained(tiny_fill_snapshot, device="cpu", dtype=torch.float32, variant=variant)


def test_control_on_a_text_to_image_checkpoint_points_to_the_lora(tiny_dev_snapshot):
    with pytest.raises(ValueError, match=r"variant='control', but .* is a text-to-image checkpoint \(img_in takes 64 "
                                         r"input channels\); the base dev model with a control LoRA"):
        Pipeline.from_pretrained(tiny_dev_snapshot, device="cpu", dtype=torch.float32, variant="control")


# --------------------------------------------------------------------------------------------------
# Requests refused before any work
# --------------------------------------------------------------------------------------------------

SQUARE = picture(32, 32, seed=9)


@pytest.mark.parametrize("pipe, kwargs, message", [
    ("dev", dict(mask_image=SQUARE), r"mask_image= is for a Fill model \(FLUX.1-Fill-dev\); this is a text-to-image model"),
    ("dev", dict(control_image=SQUARE), r"control_image= is for a Canny or Depth model .* or the base dev model with a "
                                        r"control LoRA"),
    ("dev", dict(auto_resize=False), r"auto_resize= is for a Kontext model"),
    ("fill", dict(image=SQUARE), r"a Fill model needs mask_image=: image= the picture and mask_image= where to repaint"),
    ("fill", dict(mask_image=SQUARE), r"a Fill model needs image="),
    ("fill", dict(image=SQUARE, mask_image=SQUARE, control_image=SQUARE), r"control_image= is for a Canny or Depth"),
    ("fill", dict(prompt=PROMPTS, image=SQUARE, mask_image=[SQUARE] * 3),
     r"got 3 images for 2 prompt\(s\) × 1 \(mask_image=\); give one image, or one per output"),
    ("canny", dict(), r"a control model needs control_image="),
    ("canny", dict(image=SQUARE), r"image= is not taken by a control model: give the edge or depth map as control_image="),
    ("canny", dict(control_image=[SQUARE] * 2), r"got 2 images for 1 prompt\(s\) × 1 \(control_image=\)"),
    ("canny", dict(control_image=SQUARE, strength=0.5), r"strength= is for image-to-image \(text-to-image models and Fill\)"),
    ("kontext", dict(image=SQUARE, mask_image=SQUARE), r"mask_image= is for a Fill model"),
    ("kontext", dict(image=SQUARE, auto_resize="yes"), r"auto_resize must be True or False, got 'yes'"),
    ("kontext", dict(image=Image.new("RGB", (8, 40))), r"image= has an image of 8×40 pixels; images need at least 16 a side"),
    ("kontext", dict(image=torch.full((3, 32, 32), 2.0)), r"image has values in \[2, 2\]; pixels must lie in \[0, 1\]"),
    ("kontext", dict(image=torch.zeros(5, 32, 32)), r"image: an image tensor must be \(H, W\), \(C, H, W\) or \(B, C, H, W\)"),
    ("kontext", dict(image="photo.png"), r"image must be a PIL image, a numpy array or a torch tensor, got str"),
])
def test_bad_image_arguments_are_refused_by_name(request, pipe, kwargs, message):
    pipe = request.getfixturevalue(pipe)
    prompt = kwargs.pop("prompt", "a cat")
    with pytest.raises(ValueError, match=message):
        pipe(prompt, width=32, height=32, num_steps=1, progress=False, **kwargs)


def test_bad_control_lora_files_are_refused_before_the_model_changes(dev, tmp_path):
    from safetensors.torch import save_file

    from flux import CheckpointError

    rank = 2
    wide_txt = {"txt_in.lora_A.weight": torch.zeros(rank, 99), "txt_in.lora_B.weight": torch.zeros(384, rank)}
    bad_norm = {"img_in.lora_A.weight": torch.zeros(rank, 128), "img_in.lora_B.weight": torch.zeros(384, rank),
                "double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(64)}
    bad_bias = {"img_in.lora_A.weight": torch.zeros(rank, 128), "img_in.lora_B.weight": torch.zeros(384, rank),
                "img_in.lora_B.bias": torch.zeros(7)}
    for tensors, message in [(wide_txt, r"'txt_in.lora_A.weight' takes 99 input features, but txt_in has 48; only "
                                         r"img_in may be widened"),
                             (bad_norm, r"'double_blocks.0.img_attn.norm.query_norm.scale' has shape \(64,\), but it "
                                        r"replaces double_blocks.0.img_attn.norm.query_norm.scale, of shape \(128,\)"),
                             (bad_bias, r"'img_in.lora_B.bias' has shape \(7,\), but img_in .* needs \(384,\)")]:
        save_file(tensors, str(tmp_path / "bad.safetensors"))
        with pytest.raises(CheckpointError, match=message):
            dev.load_lora(tmp_path / "bad.safetensors")
        assert dev.variant == "text-to-image" and dev.model.img_in.in_features == 64


# --------------------------------------------------------------------------------------------------
# Multi-reference Kontext, flux.generate and the CLI
# --------------------------------------------------------------------------------------------------

def test_several_kontext_references_get_their_own_position_offsets(kontext, monkeypatch):
    """Each reference's tokens follow the image tokens with first position axis k = 1, 2, ...; output size
    defaults to the first reference's (after auto_resize, off here to stay small)."""
    import flux.pipelines.pipeline as pipeline_module

    seen = {}
    real_denoise = pipeline_module.denoise

    def spy(*args, condition=None, **kwargs):
        seen["condition"] = condition
        return real_denoise(*args, condition=condition, **kwargs)

    monkeypatch.setattr(pipeline_module, "denoise", spy)
    first, second = picture(48, 32, seed=10), picture(37, 70, seed=11)  # the second rounds down to 32×64
    out = kontext("a cat", image=[first, second], auto_resize=False, num_steps=1, output_type="np", progress=False)
    assert out.shape == (1, 32, 48, 3)
    ids = seen["condition"].token_ids[0]
    assert seen["condition"].tokens.shape == (1, 2 * 3 + 4 * 2, 64)
    assert ids[:6, 0].tolist() == [1] * 6 and ids[6:, 0].tolist() == [2] * 8
    assert ids[:6, 1:].tolist() == [[r, c] for r in range(2) for c in range(3)]
    assert ids[6:, 1:].tolist() == [[r, c] for r in range(4) for c in range(2)]


def test_kontext_auto_resize_picks_the_trained_resolution_of_nearest_aspect(kontext):
    from flux.pipelines.variants import reference_size

    assert reference_size(picture(300, 200, seed=0), auto_resize=True) == (1248, 832)  # 3:2
    assert reference_size(picture(100, 300, seed=0), auto_resize=True) == (672, 1568)  # the tallest there is
    assert reference_size(picture(300, 200, seed=0), auto_resize=False) == (288, 192)


def test_generate_and_the_cli_reach_the_family(tiny_fill_snapshot, tiny_kontext_snapshot, tmp_path):
    import flux
    from flux.cli.main import main

    image, mask_image = picture(48, 32, seed=12), mask(48, 32, (10, 5, 30, 25))
    ours = Pipeline.from_pretrained(tiny_fill_snapshot, device="cpu", dtype=torch.float32)
    expected = ours("a cat", image=image, mask_image=mask_image, num_steps=2, seed=5, output_type="np", progress=False)
    got = flux.generate("a cat", model=tiny_fill_snapshot, device="cpu", dtype=torch.float32, image=image,
                        mask_image=mask_image, num_steps=2, seed=5, output_type="np", progress=False)
    np.testing.assert_array_equal(got, expected)

    image.save(tmp_path / "in.png")
    mask_image.save(tmp_path / "mask.png")
    assert main(["generate", "a cat", "--model", str(tiny_fill_snapshot), "--image", str(tmp_path / "in.png"),
                 "--mask", str(tmp_path / "mask.png"), "--steps", "2", "--seed", "5", "--dtype", "fp32", "--quiet",
                 "-o", str(tmp_path / "fill.png")]) == 0
    written = np.asarray(Image.open(tmp_path / "fill.png"), dtype=np.float64) / 255
    assert np.abs(written - expected[0]).max() <= 1 / 255  # 8-bit rounding

    picture(40, 24, seed=13).save(tmp_path / "ref2.png")
    assert main(["generate", "a cat", "--model", str(tiny_kontext_snapshot), "--image", str(tmp_path / "in.png"),
                 "--image", str(tmp_path / "ref2.png"), "--no-auto-resize", "--steps", "1", "--dtype", "fp32",
                 "--quiet", "-o", str(tmp_path / "kontext.png")]) == 0
    assert Image.open(tmp_path / "kontext.png").size == (48, 32)


def test_cli_refuses_what_the_model_does_not_take(tiny_dev_snapshot, tmp_path, capsys):
    from flux.cli.main import main

    SQUARE.save(tmp_path / "in.png")
    assert main(["generate", "a cat", "--model", str(tiny_dev_snapshot), "--mask", str(tmp_path / "in.png"),
                 "--quiet", "-o", str(tmp_path / "x.png")]) == 2
    assert "mask_image= is for a Fill model" in capsys.readouterr().err
    assert main(["generate", "a cat", "--model", str(tiny_dev_snapshot), "--control-image", str(tmp_path / "no.png"),
                 "--quiet", "-o", str(tmp_path / "x.png")]) == 2
    assert "--control-image" in capsys.readouterr().err
