"""The autoencoder: parity with diffusers' `AutoencoderKL`, loading from both layouts, the official manifest,
tiling, and input validation.

The reference is diffusers' independent implementation, given our weights through diffusers' own converter
from the official layout (`convert_ldm_vae_checkpoint`), so neither our module tree nor our rename table is
trusted by the parity test. diffusers' `AutoencoderKL` works on unscaled latents (its pipelines apply the
scale and shift); the tests apply FLUX's `scale * (z - shift)` to its outputs from the formula.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux import CheckpointError, load_autoencoder
from flux.modules.autoencoder import AutoEncoder, AutoEncoderParams, Tiling, tiled

MANIFESTS = Path(__file__).resolve().parents[2] / "shared" / "manifests"
SCALE, SHIFT = 0.3611, 0.1159  # FLUX.1's vae/config.json: scaling_factor, shift_factor

# The official structure (four levels, two blocks, 16 latent channels) at a quarter of the width: 32 is the
# smallest width GroupNorm(32) allows, and the widths 32, 64, 128, 128 still differ between levels.
TINY = AutoEncoderParams(ch=32, ch_mult=(1, 2, 4, 4))


def random_autoencoder(params=TINY, seed=0) -> AutoEncoder:
    torch.manual_seed(seed)
    model = AutoEncoder(params).eval()
    with torch.no_grad():  # GroupNorm starts at weight 1, bias 0: perturb everything so every path counts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def diffusers_config(params=TINY) -> dict:
    levels = len(params.ch_mult)
    return dict(in_channels=params.in_channels, out_channels=params.out_ch, down_block_types=["DownEncoderBlock2D"] * levels,
                up_block_types=["UpDecoderBlock2D"] * levels, block_out_channels=[params.ch * m for m in params.ch_mult],
                layers_per_block=params.num_res_blocks, latent_channels=params.z_channels, norm_num_groups=32,
                scaling_factor=SCALE, shift_factor=SHIFT, use_quant_conv=False, use_post_quant_conv=False)


def diffusers_twin(model: AutoEncoder):
    """diffusers' AutoencoderKL holding `model`'s weights, renamed by diffusers' own single-file converter."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = diffusers_config(model.params)
    reference = AutoencoderKL(**config).eval()
    official = {name: t.clone() for name, t in model.state_dict().items()}
    reference.load_state_dict(convert_ldm_vae_checkpoint(official, config), strict=True)
    return reference


def images(batch=2, height=48, width=40, seed=0):
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def relative_error(ours, reference) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def test_full_size_autoencoder_matches_the_official_manifest():
    official = json.loads((MANIFESTS / "ae.json").read_text())
    with torch.device("meta"):
        model = AutoEncoder(AutoEncoderParams())
    ours = {name: list(t.shape) for name, t in model.state_dict().items()}
    assert list(ours) == list(official["tensors"])  # names, in the file's order
    assert ours == {name: shape for name, (shape, _dtype) in official["tensors"].items()}
    assert sum(p.numel() for p in model.parameters()) == official["parameters"] == 83_819_683
    assert not list(model.buffers())


def test_encode_and_decode_match_diffusers():
    model = random_autoencoder()
    reference = diffusers_twin(model)
    x = images()
    z = torch.randn(2, 16, 6, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_latents = model.encode(x)
        reference_latents = SCALE * (reference.encode(x).latent_dist.mean - SHIFT)
        ours_images = model.decode(z)
        reference_images = reference.decode(z / SCALE + SHIFT).sample
    assert ours_latents.shape == (2, 16, 6, 5) and ours_images.shape == (2, 3, 48, 40)
    error = relative_error(ours_latents, reference_latents)
    assert error <= 1e-5, f"encode: max relative error {error:.2e}"
    error = relative_error(ours_images, reference_images)
    assert error <= 1e-5, f"decode: max relative error {error:.2e}"


def test_posterior_sample_is_reproducible_differs_from_the_mean_and_matches_diffusers():
    model = random_autoencoder()
    reference = diffusers_twin(model)
    x = images()
    with torch.no_grad():
        mean = model.encode(x)
        first = model.encode(x, generator=torch.Generator().manual_seed(7))
        second = model.encode(x, generator=torch.Generator().manual_seed(7))
        other = model.encode(x, generator=torch.Generator().manual_seed(8))
        # diffusers draws its noise the same way: one randn of the mean's shape from the generator.
        reference_sample = reference.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
    assert (first - mean).abs().mean() > 1e-3 and (first - other).abs().mean() > 1e-3
    error = relative_error(first, SCALE * (reference_sample - SHIFT))
    assert error <= 1e-5, f"posterior sample: max relative error {error:.2e}"


@pytest.fixture(scope="module")
def both_layouts(tmp_path_factory):
    """The same random weights as an official `ae.safetensors` and as a diffusers `vae/` folder."""
    model = random_autoencoder()
    root = tmp_path_factory.mktemp("snapshot")
    save_file({name: t.contiguous() for name, t in model.state_dict().items()}, root / "ae.safetensors")
    diffusers_twin(model).save_pretrained(root / "vae")
    return model, root


def test_both_layouts_load_to_the_same_model(both_layouts):
    model, root = both_layouts
    x, z = images(), torch.randn(2, 16, 6, 5)
    with torch.no_grad():
        expected = model.encode(x), model.decode(z)
        for path in (root / "ae.safetensors", root / "vae", root):
            loaded = load_autoencoder(path, dtype=torch.float32)
            assert loaded.params == TINY, path
            assert all(torch.equal(a, b) for a, b in zip((loaded.encode(x), loaded.decode(z)), expected)), path
    assert load_autoencoder(root / "vae").encoder.conv_in.weight.dtype == torch.bfloat16  # the default dtype


def test_a_snapshot_prefers_ae_safetensors_over_vae(both_layouts, tmp_path):
    model, root = both_layouts
    (tmp_path / "vae").symlink_to(root / "vae")
    assert load_autoencoder(tmp_path, dtype=torch.float32).params == TINY  # only vae/: read from there
    other = random_autoencoder(seed=1)
    save_file({name: t.contiguous() for name, t in other.state_dict().items()}, tmp_path / "ae.safetensors")
    loaded = load_autoencoder(tmp_path, dtype=torch.float32)
    assert torch.equal(loaded.decoder.conv_out.weight, other.decoder.conv_out.weight)


def test_the_latent_scale_and_shift_come_from_the_diffusers_config(both_layouts, tmp_path):
    _, root = both_layouts
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").symlink_to(root / "vae" / "diffusion_pytorch_model.safetensors")
    config = json.loads((root / "vae" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.5, "shift_factor": -0.25}))
    loaded = load_autoencoder(folder)
    assert (loaded.params.scale_factor, loaded.params.shift_factor) == (0.5, -0.25)
    (folder / "config.json").write_text(json.dumps({**config, "latent_channels": 4}))
    with pytest.raises(CheckpointError, match="latent_channels = 4 but the weights imply 16"):
        load_autoencoder(folder)


def test_broken_files_are_refused_with_the_file_and_tensor_named(both_layouts, tmp_path):
    _, root = both_layouts
    tensors = load_file(root / "ae.safetensors")
    broken = tmp_path / "ae.safetensors"
    save_file({k: v for k, v in tensors.items() if k != "decoder.up.1.upsample.conv.bias"}, broken)
    with pytest.raises(CheckpointError, match=r"ae\.safetensors: missing 1 tensor.*'decoder\.up\.1\.upsample\.conv\.bias'"):
        load_autoencoder(broken)
    save_file({**tensors, "decoder.mid.attn_1.q.weight": torch.zeros(128, 128)}, broken)
    with pytest.raises(CheckpointError, match=r"'decoder\.mid\.attn_1\.q\.weight' has shape \(128, 128\)"):
        load_autoencoder(broken)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: no FLUX autoencoder here"):
        load_autoencoder(tmp_path / "empty")


# ---- tiling ----------------------------------------------------------------------------------------

def upsample_by_8(x):  # a stand-in decoder that sees only its own latent pixel: tiles cannot change it
    return x[:, :3].repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)


def pool_by_8(x):  # a stand-in encoder, equally local
    return torch.nn.functional.avg_pool2d(x, 8)


@pytest.mark.parametrize("height, width", [(40, 56), (33 * 8, 29 * 8)])  # tiles fitting evenly, and not
def test_tiles_are_placed_exactly(height, width):
    """With a function that sees only its own pixel, tiling must give exactly the untiled result: any tile
    misplaced by a pixel or weight not normalised shows. The second shape leaves a ragged last tile."""
    # Where tiles overlap, the result is w·y + (1 − w)·y for ramp weights w: exact but for an ulp or two of the
    # values (|y| < 6): rtol and atol 1e-6 are far below a misplaced pixel's O(1) error.
    x = torch.randn(2, 4, height, width)
    assert torch.allclose(tiled(upsample_by_8, x, size=16, overlap=6, scale=8), upsample_by_8(x), rtol=1e-6, atol=1e-6)
    image = torch.randn(2, 3, height * 8, width * 8)
    assert torch.allclose(tiled(pool_by_8, image, size=128, overlap=48, scale=1 / 8), pool_by_8(image), rtol=1e-6,
                          atol=1e-6)


@pytest.mark.parametrize("height, width", [(40, 56), (33, 29)])
def test_tiles_fade_into_each_other_without_seams(height, width):
    """Each tile adds its own constant: a hard cut between tiles would jump by the difference of two
    constants (about 1 here); the linear blend spreads it over the overlap of 6 * 8 output pixels, so no
    step between neighbouring pixels may exceed 2 / 48 of the constants' spread (2: the ragged last tile's
    ramps overlap another tile's flat part, where the weights sum to more than 1)."""
    offsets = iter(torch.randn(100, generator=torch.Generator().manual_seed(0)).tolist())
    seen = []

    def upsample_and_offset(x):
        seen.append(next(offsets))
        return upsample_by_8(x) + seen[-1]

    x = torch.randn(1, 4, height, width)
    difference = tiled(upsample_and_offset, x, size=16, overlap=6, scale=8) - upsample_by_8(x)
    spread = max(seen) - min(seen)
    steps = torch.cat([difference.diff(dim=2).abs().flatten(), difference.diff(dim=3).abs().flatten()])
    assert len(seen) > 4 and steps.max() <= 2 * spread / 48 + 1e-5, f"step {steps.max():.3g}, spread {spread:.3g}"


@pytest.mark.parametrize("method", ["decode", "encode"])
def test_tiled_results_approach_the_whole_image_as_tiles_grow(method):
    """The real network, tiled, against the same network on the whole 384×320 image.

    Tiling cannot be exact: each tile's GroupNorm statistics and mid-block attention see only the tile, so
    the difference is spread over the whole image (not concentrated at tile borders). On these random weights
    it is about 5% of the output's RMS for 256-pixel tiles, 9% for 192, 16% for 128 (measured, both
    directions); with trained weights and natural images, tile statistics are closer to the image's, and
    the official code offers no tiling to compare with. What the test asserts:
      - it falls as tiles grow, and is exactly zero once a tile covers the image;
      - at 256-pixel tiles it stays under 10%, far below the 110% or more of the same network on an input
        misaligned by one latent pixel (8 image pixels): a misplaced tile could not pass.
    """
    model = random_autoencoder()
    generator = torch.Generator().manual_seed(0)
    if method == "decode":
        x = torch.randn(1, 16, 48, 40, generator=generator)
        shifted = x.roll(1, dims=2)
    else:
        x = torch.rand(1, 3, 384, 320, generator=generator) * 2 - 1
        shifted = x.roll(8, dims=2)
    run = getattr(model, method)

    def rms(t):
        return t.pow(2).mean().sqrt().item()

    with torch.no_grad():
        whole = run(x, tile=False)
        errors = {}
        for size in (128, 192, 256, 384):
            model.tiling = Tiling(size=size, overlap=64)
            errors[size] = rms(run(x, tile=True) - whole) / rms(whole)
        misaligned = rms(run(shifted, tile=False) - whole) / rms(whole)
    assert errors[128] > errors[192] > errors[256] > errors[384] == 0, errors
    assert errors[256] < 0.10 < 1.0 < misaligned, (errors, misaligned)


def test_tiling_switches_on_above_the_size_and_batch_slices_agree():
    model = random_autoencoder()
    z = torch.randn(3, 16, 24, 16)  # a 192×128 image: 24,576 pixels
    with torch.no_grad():
        whole, tiles = model.decode(z, tile=False), None
        model.tiling = Tiling(size=64, overlap=32, auto_above=192 * 128)
        assert torch.equal(model.decode(z), whole)  # not above: untiled
        model.tiling = Tiling(size=64, overlap=32, auto_above=192 * 128 - 1)
        tiles = model.decode(z, tile=True)
        assert torch.equal(model.decode(z), tiles) and not torch.allclose(tiles, whole, atol=1e-3)
        model.tiling = Tiling(size=64, overlap=32, max_batch=2)
        # Batch items are independent; slices of 2 rather than 3 may let oneDNN block the convolutions' fp32
        # sums differently: rounding only.
        assert torch.allclose(model.decode(z, tile=False), whole, rtol=1e-5, atol=1e-5)
        assert torch.allclose(model.decode(z, tile=True), tiles, rtol=1e-5, atol=1e-5)


# ---- validation --------------------------------------------------------------------------------------

def test_inputs_are_validated_with_a_clear_message():
    model = random_autoencoder()
    with pytest.raises(ValueError, match=r"encode expects \(B, C, H, W\) images with C = 3; got shape \(1, 4, 16, 16\)"):
        model.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8, got 20×16; resize or crop the image, e.g. to 16×16"):
        model.encode(torch.zeros(1, 3, 20, 16))
    with pytest.raises(ValueError, match=r"decode expects \(B, z_channels, H/8, W/8\) latents with C = 16; got shape \(2, 64, 4\)"):
        model.decode(torch.zeros(2, 64, 4))
    model.tiling = Tiling(size=100, overlap=20)
    with pytest.raises(ValueError, match="size 100 and overlap 20 must be multiples of 8"):
        model.decode(torch.zeros(1, 16, 4, 4), tile=True)
    with pytest.raises(ValueError, match="overlap 64 must be positive and smaller than the tile size 64"):
        Tiling(size=64, overlap=64)
    with pytest.raises(ValueError, match=r"ch \* ch_mult = \[48, 96\] must be a positive multiple of 32"):
        AutoEncoderParams(ch=48, ch_mult=(1, 2))


@pytest.mark.parametrize("dtype, tolerance", [
    # fp32: the same sums in another order (the folded taps added first), rounding ~1e-6 of the largest value.
    (torch.float32, 5e-6),
    # bf16: the folded kernel is rounded to bf16 once (2^-9 relative), against each tap rounded alone; both sides
    # accumulate in fp32 inside oneDNN, so the difference is a few bf16 roundings of the output's magnitude.
    (torch.bfloat16, 1e-2),
])
def test_subpixel_upsample_equals_upsampling_then_convolving(dtype, tolerance):
    from torch.nn import functional as F

    from flux.modules.autoencoder import Upsample

    torch.manual_seed(0)
    layer = Upsample(48).to(dtype)
    for shape in [(2, 48, 7, 5), (1, 48, 16, 16)]:  # odd and even sizes, a batch of two
        x = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            expected = layer.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(dtype)).float()
            got = layer(x).float()
        assert got.shape == expected.shape
        error = ((got - expected).abs().max() / expected.abs().max()).item()
        assert error < tolerance, (shape, dtype, error)
