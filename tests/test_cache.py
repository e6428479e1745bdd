"""First-Block-Cache (flux/runtime/cache.py): exact when it never skips, close when it does, and invisible outside.

No reference library implements step caching for this model, so the checks are the invariants that define
it: threshold 0 reproduces the uncached run bit for bit (the same blocks see the same inputs); a step that
repeats the previous one exactly is skipped and reproduces it up to one rounding of the residual's
subtraction and addition; a model whose only block is the probe loses nothing by skipping; the image error
grows with the threshold and stays bounded on the built-in model at 28 and 50 steps.
"""

from dataclasses import replace

import pytest
import torch
from test_model import random_model, tiny_inputs

from flux import Pipeline
from flux.modules.configs import TINY
from flux.pipelines.sampling import denoise, get_schedule, image_ids, text_ids
from flux.pipelines.snapshots import builtin_model
from flux.runtime.cache import first_block_cache
from flux.modules.transformer import Flux


def sample(model, *, steps=12, cache_threshold=None):
    """A dev-style trajectory (shifted schedule) of a random tiny model; (latents, which calls skipped)."""
    torch.manual_seed(0)
    img, txt, vec = torch.randn(2, 6, 64), torch.randn(2, 5, 48), torch.randn(2, 40)
    inputs = (img, image_ids(2, 32, 48), txt, text_ids(2, 5), vec, get_schedule(steps, 6, shift=True))
    with torch.inference_mode():
        if cache_threshold is None:
            return denoise(model, *inputs), None
        with first_block_cache(model, threshold=cache_threshold) as state:
            return denoise(model, *inputs), state.steps


def test_threshold_zero_is_the_uncached_run_exactly():
    model = random_model()
    uncached, _ = sample(model)
    cached, skipped = sample(model, cache_threshold=0)
    assert skipped == [False] * 12
    # Exact: every block runs on the same inputs; the cache only reads their outputs.
    assert torch.equal(cached, uncached)


def test_a_repeated_step_is_skipped_and_reproduced():
    model, inputs = random_model(), tiny_inputs()
    with torch.no_grad():
        expected = model(**inputs)
        with first_block_cache(model, threshold=1e-3) as state:
            first, second = model(**inputs), model(**inputs)
    assert state.steps == [False, True]  # the second call's first block changed by exactly 0
    assert torch.equal(first, expected)
    # Skipped: (probe output) + (full output − probe output), fp32 rounding of the subtraction and addition.
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-5)


def test_skipping_loses_nothing_when_the_probe_is_the_only_block():
    # One double block and no single blocks: the tail adds nothing, so every skip is exact up to rounding,
    # whatever the threshold: checks the residual bookkeeping (text first, image after) of the reuse path.
    params = replace(TINY, depth=1, depth_single_blocks=0)
    torch.manual_seed(0)
    model = Flux(params).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    uncached, _ = sample(model)
    cached, skipped = sample(model, cache_threshold=1e9)
    assert skipped == [False] + [True] * 11
    torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-5)


def test_the_model_is_restored_and_its_keys_unchanged():
    model = random_model()
    keys, blocks = list(model.state_dict()), (model.double_blocks, model.single_blocks)
    with pytest.raises(RuntimeError, match="inside"):
        with first_block_cache(model, threshold=0.1):
            assert list(model.state_dict()) == keys  # the same blocks under the same names, hooks and all
            raise RuntimeError("inside")
    assert (model.double_blocks, model.single_blocks) == blocks


@pytest.mark.parametrize("steps", [28, 50])
def test_cached_image_error_on_the_builtin_model(steps):
    pipe = Pipeline.from_pretrained(builtin_model(), device="cpu", dtype=torch.float32)
    arguments = dict(width=64, height=64, num_steps=steps, seed=3, output_type="pt", progress=False)
    reference = pipe("a red circle on a blue background", **arguments)
    errors = []
    for threshold in (0.05, 0.2):
        image = pipe("a red circle on a blue background", cache="first-block", cache_threshold=threshold, **arguments)
        errors.append((image - reference).abs().mean().item())
    # Pixels in [0, 1]. Measured 0.0002-0.0004 at 0.05 and 0.0036-0.0037 at 0.2; the bound is the 1 %.
    assert 0 < errors[0] < errors[1] < 0.01, errors


def test_bad_cache_arguments_are_refused():
    pipe = Pipeline.from_pretrained(builtin_model(), device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="cache must be None or one of"):
        pipe("a cat", cache="tea")
    with pytest.raises(ValueError, match="cache_threshold must be a finite number"):
        pipe("a cat", cache="first-block", cache_threshold=-1)
    with pytest.raises(ValueError, match="does not combine with true classifier-free guidance"):
        pipe("a cat", cache="first-block", negative_prompt="a dog", true_cfg_scale=2.0)
    with pytest.raises(ValueError, match="at least one double-stream block"):
        with first_block_cache(Flux(replace(TINY, depth=0)), threshold=0.1):
            pass
