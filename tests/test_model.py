"""The transformer: full-size structure against the official manifests, and invariants no reference is needed for.

Numerical parity with diffusers' independent implementation is in test_loading.py, where both read the
same files.
"""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flux.modules.configs import TINY, configs
from flux.modules.transformer import Flux, FluxParams, apply_rope, rope_table, timestep_embedding

MANIFESTS = Path(__file__).resolve().parents[2] / "shared" / "manifests"


@pytest.mark.parametrize("preset, manifest", [("flux-schnell", "flux1-schnell.json"), ("flux-dev", "flux1-dev.json")])
def test_full_size_model_matches_the_official_manifest(preset, manifest):
    official = json.loads((MANIFESTS / manifest).read_text())
    with torch.device("meta"):
        model = Flux(configs[preset].params)
    ours = {name: list(t.shape) for name, t in model.state_dict().items()}
    assert list(ours) == list(official["tensors"])  # names, in the file's order
    assert ours == {name: shape for name, (shape, _dtype) in official["tensors"].items()}
    assert sum(p.numel() for p in model.parameters()) == official["parameters"]


def tiny_inputs(batch=2, height=3, width=5, text=7, params=TINY, seed=0):
    generator = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None]
    return dict(
        img=torch.randn(batch, height * width, params.in_channels, generator=generator),
        img_ids=img_ids.reshape(1, -1, 3).repeat(batch, 1, 1),
        txt=torch.randn(batch, text, params.context_in_dim, generator=generator),
        txt_ids=torch.zeros(batch, text, 3),
        timesteps=torch.rand(batch, generator=generator),
        y=torch.randn(batch, params.vec_in_dim, generator=generator),
        guidance=torch.full((batch,), 3.5) if params.guidance_embed else None,
    )


def random_model(params=TINY, seed=0) -> Flux:
    torch.manual_seed(seed)
    model = Flux(params).eval()
    with torch.no_grad():  # nothing zero-initialised may hide a wrong path
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def test_batch_items_are_independent():
    model, inputs = random_model(), tiny_inputs(batch=3)
    with torch.no_grad():
        together = model(**inputs)
        alone = model(**{k: v[1:2] if v is not None else None for k, v in inputs.items()})
    torch.testing.assert_close(together[1:2], alone, rtol=1e-5, atol=1e-5)


def test_rotary_attention_is_unchanged_when_all_positions_shift():
    # Rotary embeddings make q·k depend only on relative positions.
    generator = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 2, 10, 128, generator=generator), torch.randn(2, 2, 10, 128, generator=generator)
    ids = torch.randint(0, 64, (2, 10, 3), generator=generator).float()
    scores = [apply_rope(q, rope_table(ids + s, (16, 56, 56), 10_000)) @ apply_rope(k, rope_table(ids + s, (16, 56, 56), 10_000)).transpose(-1, -2)
              for s in (0.0, 17.0)]
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-4, atol=1e-3)
    # ... and it does depend on the positions themselves.
    unrotated = q @ k.transpose(-1, -2)
    assert (scores[0] - unrotated).abs().max() > 1.0


def test_rope_rotates_adjacent_pairs_by_position_times_frequency():
    # Independent formula: channel pair p of axis a turns by angle pos_a / theta^(2p / dim_a).
    x = torch.zeros(1, 1, 1, 128)
    x[..., 16 + 2 * 3] = 1.0  # pair 3 of the row axis, first element
    ids = torch.tensor([[[0.0, 5.0, 9.0]]])
    out = apply_rope(x, rope_table(ids, (16, 56, 56), 10_000))
    angle = 5.0 / 10_000 ** (6 / 56)
    expected = torch.zeros_like(x)
    expected[..., 16 + 6], expected[..., 16 + 7] = math.cos(angle), math.sin(angle)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_timestep_embedding_scales_t_by_1000_and_puts_cosines_first():
    t = torch.tensor([0.25])
    emb = timestep_embedding(t, 256)
    frequency_0, frequency_1 = 1.0, math.exp(-math.log(10_000) / 128)
    torch.testing.assert_close(emb[0, [0, 1, 128, 129]], torch.tensor([
        math.cos(250 * frequency_0), math.cos(250 * frequency_1), math.sin(250 * frequency_0), math.sin(250 * frequency_1)]))


def test_text_mask_hides_padding_tokens():
    model, inputs = random_model(), tiny_inputs(batch=1, text=7)
    mask = torch.tensor([[True] * 4 + [False] * 3])
    changed = dict(inputs, txt=inputs["txt"].clone())
    changed["txt"][:, 4:] += 10.0  # what the masked tokens hold must not matter
    with torch.no_grad():
        a, b = model(**inputs, txt_mask=mask), model(**changed, txt_mask=mask)
        unmasked = model(**changed)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - unmasked).abs().max() > 1e-3


@pytest.mark.parametrize("name, value, message", [
    ("img", torch.randn(2, 15, 60), r"'img' has shape \(2, 15, 60\), expected \(\*, \*, 64\)"),
    ("txt_ids", torch.zeros(2, 7, 2), r"'txt_ids' has shape \(2, 7, 2\), expected \(2, 7, 3\)"),
    ("y", torch.randn(2, 768), r"'y' has shape \(2, 768\), expected \(2, 40\)"),
])
def test_wrong_input_shapes_are_named(name, value, message):
    with pytest.raises(ValueError, match=message):
        random_model()(**dict(tiny_inputs(), **{name: value}))


def test_guidance_model_requires_guidance():
    params = replace(TINY, guidance_embed=True)
    with pytest.raises(ValueError, match="guidance-distilled"):
        random_model(params)(**dict(tiny_inputs(params=params), guidance=None))


@pytest.mark.parametrize("change, message", [
    (dict(num_heads=5), "divisible by num_heads"),
    (dict(axes_dim=(16, 56, 64)), "must equal head_dim 128"),
])
def test_params_are_validated(change, message):
    with pytest.raises(ValueError, match=message):
        FluxParams(**{**TINY.__dict__, **change})
