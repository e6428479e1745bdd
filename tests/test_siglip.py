"""The SigLIP vision tower and its preprocessing against transformers' `SiglipVisionModel` and `SiglipImageProcessor`.

transformers builds a small random SigLIP vision tower and saves it as FLUX.1-Redux-dev lays it out
(`image_encoder/`, `feature_extractor/`); we read those folders and compare pixel values, every patch's final
state and the pooled output. The full-size module is checked against the official file's manifest.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from snapshots import MANIFESTS

from flux import CheckpointError
from flux.modules.siglip import SO400M_PATCH14_384, TINY, SiglipVisionModel
from flux.weights.loading import shapes_only
from flux.weights.redux import ImagePreprocessing, read_siglip_config, siglip_official_names

transformers = pytest.importorskip("transformers")


def reference_config(config=TINY):
    return transformers.SiglipVisionConfig(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        image_size=config.image_size, patch_size=config.patch_size, num_channels=3, layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh", vision_use_head=True)


def reference_processor(size: int):
    # FLUX.1-Redux-dev's feature_extractor/preprocessor_config.json with the tiny size. The Pillow implementation is
    # transformers 4's `SiglipImageProcessor`, which the official pipelines ran; transformers 5 renamed it
    # `SiglipImageProcessorPil` (its default `SiglipImageProcessor` resizes with torchvision, which differs slightly).
    return transformers.SiglipImageProcessorPil(size={"height": size, "width": size}, resample=3, do_resize=True,
                                                do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                                image_mean=[0.5] * 3, image_std=[0.5] * 3)


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.SiglipVisionModel(reference_config()).eval()
    with torch.no_grad():  # transformers' initialisation, then noise everywhere (norms start at 1 and 0)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    root = tmp_path_factory.mktemp("siglip")
    model.save_pretrained(root / "image_encoder")  # transformers 5 writes the keys without `vision_model.`
    reference_processor(TINY.image_size).save_pretrained(root / "feature_extractor")
    return root, model


def ours_from(folder) -> SiglipVisionModel:
    config = read_siglip_config(folder)
    with shapes_only():
        model = SiglipVisionModel(config)
    state = siglip_official_names(load_file(folder / "model.safetensors"), source=folder)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def sample_images() -> list[Image.Image]:
    """Sizes larger and smaller than the target, non-square, and the modes Pillow opens files in."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (123, 301, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (64, 40, 4), dtype=np.uint8), "RGBA")
    palette = rgb.resize((50, 90)).convert("P")
    palette.info["transparency"] = 7  # a GIF-style transparent palette entry: composited onto white
    return [rgb, rgb.convert("L"), rgba, palette, rgba.convert("LA"), rgb.convert("CMYK").resize((17, 29)), rgb.resize((75, 75))]


def test_preprocessing_is_transformers_bit_for_bit(encoder_folder):
    root, _ = encoder_folder
    ours = ImagePreprocessing.from_folder(root / "feature_extractor")
    images = sample_images()
    reference = reference_processor(TINY.image_size)(images=images, return_tensors="pt", do_convert_rgb=True)["pixel_values"]
    pixels = ours(images)
    assert pixels.shape == (len(images), 3, 75, 75) and pixels.dtype == torch.float32
    # The same Pillow resize of the same 8-bit image, the same float64 rescale and float32 normalisation: equal.
    assert torch.equal(pixels, reference), f"max difference {(pixels - reference).abs().max():.2e}"


def test_official_preprocessing_defaults():
    """The defaults are FLUX.1-Redux-dev's preprocessor_config.json: 384² bicubic, 1/255, mean and std 0.5."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (500, 333, 3), dtype=np.uint8))
    reference = reference_processor(384)(images=image, return_tensors="pt")["pixel_values"]
    assert torch.equal(ImagePreprocessing()(image), reference)


def relative_error(ours, reference):
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def test_outputs_match_transformers(encoder_folder):
    root, reference = encoder_folder
    ours = ours_from(root / "image_encoder")
    pixels = ImagePreprocessing.from_folder(root / "feature_extractor")(sample_images())
    with torch.no_grad():
        expected = reference(pixel_values=pixels)
        hidden, pooled = ours(pixels), ours.pooled(pixels)
    assert hidden.shape == (len(pixels), TINY.num_patches, TINY.hidden_size)
    # fp32 with the same reductions in a different order (SDPA vs transformers' eager attention): ~1e-7 relative.
    error = relative_error(hidden, expected.last_hidden_state)
    assert error <= 1e-5, f"last_hidden_state relative error {error:.2e}"
    error = relative_error(pooled, expected.pooler_output)
    assert error <= 1e-5, f"pooled relative error {error:.2e}"


def test_transformers_4_names_load_too(encoder_folder, tmp_path):
    """The official file was written by transformers 4, under `vision_model.` and with the position ids."""
    root, reference = encoder_folder
    state = load_file(root / "image_encoder" / "model.safetensors")
    old = {f"vision_model.{name}": t for name, t in state.items()}
    old["vision_model.embeddings.position_ids"] = torch.arange(TINY.num_patches)[None]
    folder = tmp_path / "image_encoder"
    folder.mkdir()
    save_file(old, folder / "model.safetensors")
    (folder / "config.json").write_text((root / "image_encoder" / "config.json").read_text())
    pixels = torch.randn(2, 3, 75, 75)
    with torch.no_grad():  # safetensors' load_file copies into fresh tensors: the same kernels, the same inputs
        assert torch.equal(ours_from(folder)(pixels), ours_from(root / "image_encoder")(pixels))
    mixed = {**state, "vision_model.post_layernorm.bias": state["post_layernorm.bias"]}
    with pytest.raises(CheckpointError, match="mixes two layouts"):
        siglip_official_names(mixed, source=folder)


def test_wrong_pixel_size_is_refused():
    with shapes_only():
        model = SiglipVisionModel(TINY)
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, 75, 75\), got \(1, 3, 64, 64\)"):
        model(torch.zeros(1, 3, 64, 64, device="meta"))


@pytest.mark.skipif(MANIFESTS is None, reason="the manifests of the official files are not on this machine")
def test_full_size_matches_the_manifest():
    manifest = json.loads((MANIFESTS / "siglip-so400m.json").read_text())
    with torch.device("meta"):
        model = SiglipVisionModel(SO400M_PATCH14_384)
    ours = {name: [list(t.shape), "BF16"] for name, t in model.state_dict().items()}
    assert list(ours.items()) == list(manifest["tensors"].items())  # names, shapes and their order
    assert sum(p.numel() for p in model.parameters()) == manifest["parameters"]
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 384, 384, device="meta"))
    assert out.shape == (1, 729, 1152)


def test_official_config_reads_as_the_preset(tmp_path):
    # image_encoder/config.json of black-forest-labs/FLUX.1-Redux-dev (as transformers writes a SiglipVisionConfig).
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["SiglipVisionModel"], "attention_dropout": 0.0, "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152, "image_size": 384, "intermediate_size": 4304, "layer_norm_eps": 1e-06,
        "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 27,
        "patch_size": 14, "torch_dtype": "bfloat16"}))
    assert read_siglip_config(tmp_path) == SO400M_PATCH14_384
    (tmp_path / "config.json").write_text(json.dumps({"hidden_act": "relu", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="hidden_act is 'relu'"):
        read_siglip_config(tmp_path)
