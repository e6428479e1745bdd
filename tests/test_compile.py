"""Regional compilation: the blocks compile whole (fullgraph), give eager mode's numbers, share their compiled
code, and do not recompile from step to step, nor (after one more compilation) from size to size.

Most tests use the `aot_eager` backend: dynamo traces and checks exactly what it would for inductor, and the
graph runs on eager kernels, so compiling takes seconds on a CPU instead of a minute. One test runs inductor.
"""

from dataclasses import replace

import pytest
import torch
from torch._dynamo.utils import counters

from flux.runtime.compile import compile_blocks
from flux.modules.configs import TINY
from flux.modules.transformer import Flux
from flux.runtime.offload import offload_blocks
from flux.pipelines.sampling import denoise, get_schedule, image_ids, text_ids

# FLUX's head dim (128) in two heads, and two blocks of each kind, to show that the blocks of a kind share code.
SMALL = replace(TINY, hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from nothing, and counts only its own compilations."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def small_model(params=SMALL) -> Flux:
    torch.manual_seed(0)
    model = Flux(params).eval().requires_grad_(False)
    with torch.no_grad():  # nothing zero-initialised may hide a path
        for parameter in model.parameters():
            parameter.normal_(0, 0.05)
    return model


def generate(model: Flux, height: int, width: int, *, text: int = 5, steps: int = 4) -> torch.Tensor:
    """The 4-step schnell loop on random conditioning, at an image size in pixels."""
    generator = torch.Generator().manual_seed(0)
    tokens = (height // 16) * (width // 16)
    img = torch.randn(1, tokens, 64, generator=generator)
    txt = torch.randn(1, text, model.params.context_in_dim, generator=generator)
    vec = torch.randn(1, model.params.vec_in_dim, generator=generator)
    with torch.inference_mode():
        return denoise(model, img, image_ids(1, height, width), txt, text_ids(1, text), vec,
                       get_schedule(steps, tokens, shift=False))


def test_blocks_compile_once_per_kind_and_not_again_across_steps_or_sizes():
    model = small_model()
    eager = generate(model, 32, 48)
    compile_blocks(model, backend="aot_eager")
    # A recompilation raises: none from one block to the next of its kind, none from step to step.
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = generate(model, 32, 48)
    assert compiled_graphs() == 2  # one double-stream block, one single-stream block, for four blocks
    # aot_eager runs eager mode's kernels on the traced graph: the numbers agree to fp32 rounding, and have
    # been equal to the bit; but a decomposition AOTAutograd chooses (and on another CPU, another kernel for
    # it) may sum in another order, a few fp32 ulps on values of order 1 through the blocks' norms.
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)

    # A new size compiles each kind of block once more, with the sequence lengths symbolic ...
    torch.testing.assert_close(generate(model, 64, 48), generate(small_model(), 64, 48), rtol=1e-5, atol=1e-5)
    assert compiled_graphs() <= 4
    # ... and later sizes reuse that.
    with torch._dynamo.config.patch(error_on_recompile=True):
        generate(model, 64, 96)
        generate(model, 48, 16)


def test_compiled_blocks_run_under_block_offload():
    """The offload hooks run eagerly around the compiled blocks and hand them new parameter objects every step;
    that must not cause a recompilation."""
    model = small_model()
    eager = generate(model, 32, 32)
    compile_blocks(model, backend="aot_eager")
    offload_blocks(model, device="cpu")
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = generate(model, 32, 32)
    assert compiled_graphs() == 2
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)  # fp32 rounding, as above


# apply_rope's complex multiply is left to its eager kernel by inductor, which says so.
@pytest.mark.filterwarnings("ignore:Torchinductor does not support code generation for complex operators")
def test_inductor_compiles_the_blocks(tmp_path, monkeypatch):
    # A cache of its own: inductor's on-disk cache is keyed without ATen's CPU capability, and a kernel built in
    # an AVX-512 process, reused under ATEN_CPU_CAPABILITY=avx2 (as .ci/run's second pass runs), returned
    # garbage here (torch 2.13, Zen 4: 1e37 for `rms_norm(x) * sigmoid(x)`); built afresh it is right.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = small_model(replace(SMALL, depth=1, depth_single_blocks=1))
    eager = generate(model, 32, 32, steps=1)
    state = list(model.state_dict())
    compile_blocks(model)
    compiled = generate(model, 32, 32, steps=1)
    assert compiled_graphs() == 2 and list(model.state_dict()) == state
    # Inductor fuses the elementwise work and may sum in another order: differences of fp32 rounding, on values
    # of order 1, through a few norms (measured: about 1e-6).
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_compiling_twice_is_refused():
    model = small_model()
    compile_blocks(model, backend="aot_eager")
    with pytest.raises(ValueError, match="already compiled"):
        compile_blocks(model, backend="aot_eager")
