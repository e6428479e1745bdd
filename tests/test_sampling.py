"""The sampling pieces against diffusers' `FluxPipeline` helpers and scheduler, and against their formulas."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from flux.modules.configs import TINY
from flux.modules.transformer import Flux, rope_table
from flux.pipelines.sampling import denoise, get_noise, get_schedule, image_ids, img2img_start, pack, text_ids, unpack

pipeline_flux = pytest.importorskip("diffusers.pipelines.flux.pipeline_flux")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402


@pytest.mark.parametrize("height, width", [(64, 64), (48, 80), (16, 32)])
def test_noise_packing_and_ids_match_diffusers(height, width):
    ours = get_noise(2, height, width, seed=42)
    shape = (2, 16, 2 * (height // 16), 2 * (width // 16))
    theirs = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(42), dtype=torch.float32)
    assert torch.equal(ours, theirs)
    packed = pipeline_flux.FluxPipeline._pack_latents(theirs, 2, 16, shape[2], shape[3])
    assert torch.equal(pack(ours), packed)
    assert torch.equal(unpack(packed, height, width), theirs)
    assert torch.equal(image_ids(2, height, width)[1], pipeline_flux.FluxPipeline._prepare_latent_image_ids(2, shape[2] // 2, shape[3] // 2, "cpu", torch.float32))
    assert torch.equal(text_ids(2, 7), torch.zeros(2, 7, 3))


def test_a_list_of_seeds_draws_each_sample_alone():
    batch = get_noise(3, 32, 48, seed=[5, 6, 7])
    assert torch.equal(batch[1:2], get_noise(1, 32, 48, seed=6))
    generators = [torch.Generator("cpu").manual_seed(s) for s in (5, 6, 7)]
    assert torch.equal(batch, randn_tensor(batch.shape, generator=generators, dtype=torch.float32))
    with pytest.raises(ValueError, match="got 2 seeds for 3 samples"):
        get_noise(3, 32, 48, seed=[1, 2])


def test_odd_sizes_round_up_like_the_official_sampler():
    assert get_noise(1, 40, 24, seed=0).shape == (1, 16, 6, 4)  # 2·ceil(40/16), 2·ceil(24/16)


def diffusers_times(num_steps, image_seq_len, *, dynamic):
    # As FluxPipeline.__call__ sets up the official scheduler configs (manifests/README.md).
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0 if not dynamic else 3.0,
                                                use_dynamic_shifting=dynamic, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    mu = pipeline_flux.calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    return scheduler.sigmas.tolist()


@pytest.mark.parametrize("num_steps", [1, 4, 28])
@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096, 6000])
def test_schedule_matches_diffusers_scheduler(num_steps, image_seq_len):
    for shift in (False, True):
        ours = get_schedule(num_steps, image_seq_len, shift=shift)
        np.testing.assert_allclose(ours, diffusers_times(num_steps, image_seq_len, dynamic=shift), rtol=1e-6, atol=1e-6)


def test_shift_formula_at_its_anchor_points():
    # mu = 0.5 at 256 tokens: t = 0.5 maps to e^0.5 / (e^0.5 + 1).
    assert get_schedule(2, 256, shift=True)[1] == pytest.approx(math.exp(0.5) / (math.exp(0.5) + 1))
    assert get_schedule(2, 4096, shift=True)[1] == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1))
    assert get_schedule(2, 4096, shift=False) == [1.0, 0.5, 0.0]


def test_img2img_start_lies_on_the_straight_path():
    x0, noise = torch.randn(1, 6, 64), torch.randn(1, 6, 64)
    times = get_schedule(10, 6, shift=False)
    x, rest = img2img_start(x0, noise, times, strength=0.35)
    assert rest == times[6:]  # int(0.65 · 10) = 6 steps skipped
    torch.testing.assert_close(x, rest[0] * noise + (1 - rest[0]) * x0)
    assert img2img_start(x0, noise, times, strength=1.0)[1] == times
    with pytest.raises(ValueError, match=r"strength must lie in \(0, 1\], got 0"):
        img2img_start(x0, noise, times, strength=0)


def test_euler_step_and_true_cfg_follow_their_formulas():
    torch.manual_seed(0)
    model = Flux(TINY).eval().requires_grad_(False)
    img, txt, neg, vec = torch.randn(1, 6, 64), torch.randn(1, 5, 48), torch.randn(1, 5, 48), torch.randn(1, 40)
    ids, tids = image_ids(1, 32, 48), text_ids(1, 5)
    t = torch.tensor([1.0])
    v = model(img, ids, txt, tids, t, vec)
    u = model(img, ids, neg, tids, t, vec)
    seen = []
    out = denoise(model, img, ids, txt, tids, vec, [1.0, 0.25], callback=lambda i, tc, x: seen.append((i, tc)))
    torch.testing.assert_close(out, img - 0.75 * v)
    assert seen == [(0, 1.0)]
    out = denoise(model, img, ids, txt, tids, vec, [1.0, 0.25], negative=(neg, vec, None), true_cfg_scale=3.0)
    torch.testing.assert_close(out, img - 0.75 * (u + 3.0 * (v - u)))


# What makes the host wait for a GPU: reading a value back (item, tolist, cpu, numpy, bool/float/int/index of a
# tensor), an output whose size depends on values (nonzero), and explicit synchronisation.
HOST_SYNCS = [(torch.Tensor, name) for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__",
                                                "__index__", "nonzero")]
HOST_SYNCS += [(torch, "nonzero"), (torch.cuda, "synchronize"), (torch.cuda.Stream, "synchronize"),
               (torch.cuda.Event, "synchronize")]


@pytest.mark.parametrize("case", ["plain", "true CFG, dev-style", "block offload"])
def test_the_step_loop_never_waits_for_the_device(case, monkeypatch):
    """On a GPU the host queues the steps' kernels ahead of the device; one read-back per step would stall it.
    The CPU cannot show a stall, so every operation that would cause one raises here while `denoise` runs."""
    from flux.runtime.offload import offload_blocks

    params = replace(TINY, guidance_embed=case == "true CFG, dev-style")
    torch.manual_seed(0)
    model = Flux(params).eval().requires_grad_(False)
    if case == "block offload":
        offload_blocks(model, device="cpu")
    img, txt, vec = torch.randn(2, 6, 64), torch.randn(2, 5, 48), torch.randn(2, 40)
    negative = (torch.randn(2, 5, 48), vec, None) if case == "true CFG, dev-style" else None
    # The schedule is a list of floats, made (and read back) once, before the loop.
    inputs = (img, image_ids(2, 32, 48), txt, text_ids(2, 5), vec, get_schedule(4, 6, shift=True))

    def host_sync(*args, **kwargs):
        raise AssertionError("the host waits for the device inside denoise")

    for owner, name in HOST_SYNCS:
        monkeypatch.setattr(owner, name, host_sync)
    with pytest.raises(AssertionError, match="host waits"):  # the net holds
        bool(torch.ones(()))
    with torch.inference_mode():
        x = denoise(model, *inputs, guidance=3.5, negative=negative, true_cfg_scale=2.0)
    monkeypatch.undo()
    assert x.shape == img.shape and torch.isfinite(x).all()


def test_the_rotary_table_is_built_once_per_generation(monkeypatch):
    import flux.modules.transformer

    torch.manual_seed(0)
    model = Flux(TINY).eval().requires_grad_(False)
    img, txt, vec, ids, tids = torch.randn(1, 6, 64), torch.randn(1, 5, 48), torch.randn(1, 40), image_ids(1, 32, 48), text_ids(1, 5)
    with torch.no_grad():
        expected = model(img, ids, txt, tids, torch.ones(1), vec)  # a direct call builds its own table
        assert torch.equal(model(img, ids, txt, tids, torch.ones(1), vec, rope=model.rope(ids, tids)), expected)
        with pytest.raises(ValueError, match=r"rope has shape \(1, 1, 6, 64, 2, 2\), expected \(1, 1, 11, \.\.\.\)"):
            model(img, ids, txt, tids, torch.ones(1), vec, rope=model.rope(ids, tids[:, :0]))

    calls = []
    monkeypatch.setattr(flux.modules.transformer, "rope_table", lambda *args: calls.append(args) or rope_table(*args))
    with torch.no_grad():
        denoise(model, img, ids, txt, tids, vec, get_schedule(4, 6, shift=False))
        assert len(calls) == 1
        # True CFG: a negative prompt as long as the prompt shares the table; a shorter one needs its own.
        denoise(model, img, ids, txt, tids, vec, get_schedule(4, 6, shift=False), negative=(txt, vec, None), true_cfg_scale=2.0)
        assert len(calls) == 2
        denoise(model, img, ids, txt, tids, vec, get_schedule(4, 6, shift=False), negative=(txt[:, :3], vec, None), true_cfg_scale=2.0)
        assert len(calls) == 4


def test_a_schedule_too_large_to_shift_is_refused():
    """Found by this session's long fuzz run (via an image_size of 2³¹ in flux_defaults.json): e^mu overflowed."""
    with pytest.raises(ValueError, match="67108864 tokens is too large for the shifted schedule"):
        get_schedule(4, 2**26, shift=True)
    assert get_schedule(4, 2**26, shift=False)[1] == 0.75  # the plain schedule does not depend on the size
