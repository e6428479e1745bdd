"""Step caching for many-step sampling: First-Block-Cache, acting on a built FLUX transformer from outside.

Along a sampling trajectory the transformer's output changes slowly from one step to the next, most of all in
the middle of a 28–50 step dev-style schedule. First-Block-Cache (Cheng, ParaAttention, 2024; the idea of
TeaCache, Liu et al., 2024, "Timestep Embedding Tells", with the first block as the probe) exploits that:

- every step runs the first double-stream block, and compares the change its image stream made (its residual,
  output − input) with that change at the last step that ran every block:
  relative change = mean|r − r_full| / mean|r_full|;
- below `threshold`, the other blocks are skipped and their joint residual saved at that full step
  (the output of the last single block − the joint input after the first block) is added instead;
- otherwise all the blocks run, and their residuals are kept for later steps.

The comparison is always against the last full step, so small changes add up until one more step runs in full
(TeaCache's accumulated distance, in effect). Threshold 0 never skips and gives the uncached result exactly
(the same blocks see the same inputs; tests/test_cache.py). Higher thresholds skip more and drift more; see
benchmarks/README.md ("Step caching") for speed and error at 28 and 50 steps. It helps where steps are many and
similar; with schnell's 4 steps nearly every step changes too much to skip, and it only adds the probe's cost.

Two costs to know:
- The decision is one number read back to the host at every step (`.item()`): on a GPU that waits for the
  step's queued work, the one host sync of the loop. Off (the default) the loop has none
  (tests/test_sampling.py); on, it is one per step, small beside a step of FLUX when the cache skips any.
- The decision is one for the whole batch (the mean over all its images), so with a cache the images of a
  batch are no longer computed independently of each other.

How it acts from outside: within `first_block_cache(model, ...)`, `model.double_blocks` and
`model.single_blocks` are replaced by module lists holding the very same blocks (so hooks, LoRAs, offload and
compiled blocks stay as they are) whose iteration, which `Flux.forward` drives, inserts the probe and the
reuse; on leaving they are put back. The model file knows nothing of it.

TeaCache's own gate (a polynomial of the relative change of the timestep-modulated input, fitted to the official
FLUX.1-dev weights) is not provided: its coefficients are the official model's, and there is no way to fit or
check them on the weights available here.
"""

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from flux.modules.transformer import Flux

KINDS = ("first-block",)


def check_cache(cache: str | None, threshold) -> None:
    """Refuses a cache kind or threshold that `first_block_cache` cannot use, before any work is done."""
    if cache is not None and cache not in KINDS:
        raise ValueError(f"cache must be None or one of {KINDS}, got {cache!r:.80}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < float("inf"):
        raise ValueError(f"cache_threshold must be a finite number ≥ 0, got {threshold!r:.80}")


@dataclass
class CacheState:
    """What one generation's cache holds between steps, and how often it skipped."""
    threshold: float
    first_residual: Tensor | None = None  # the first block's image residual at the last full step
    tail_residual: Tensor | None = None  # (B, T + N, C): what the other blocks added at the last full step
    tail_input: Tensor | None = None  # this step's joint stream after the first block
    skip: bool = False  # this step's decision
    steps: list[bool] = field(default_factory=list)  # per call: True where the other blocks were skipped

    @property
    def skipped(self) -> int:
        return sum(self.steps)


@contextlib.contextmanager
def first_block_cache(model: Flux, *, threshold: float):
    """Within the `with`, every call of `model` may skip all blocks but the first (see the module docstring);
    yields the `CacheState`, whose `steps` says which calls skipped. One `with` per generation: its calls must be
    the consecutive steps of one trajectory (not the two predictions of classifier-free guidance)."""
    check_cache("first-block", threshold)
    if len(model.double_blocks) == 0:
        raise ValueError("first_block_cache needs a model with at least one double-stream block (its probe)")
    state = CacheState(threshold=float(threshold))
    double_blocks, single_blocks = model.double_blocks, model.single_blocks
    model.double_blocks = CachedDoubleBlocks(double_blocks, state)
    model.single_blocks = CachedSingleBlocks(single_blocks, state)
    try:
        yield state
    finally:
        model.double_blocks, model.single_blocks = double_blocks, single_blocks


class CachedDoubleBlocks(nn.ModuleList):
    """The double-stream blocks, iterated as: the probe around block 0, then the others unless skipping."""

    def __init__(self, blocks: nn.ModuleList, state: CacheState):
        super().__init__(blocks)  # the same block objects, under the same indices
        self.state = state

    def __iter__(self):
        blocks = list(super().__iter__())
        yield FirstBlockProbe(blocks[0], self.state)
        # A generator: this line runs after Flux.forward has called the probe, so its decision is known.
        if not self.state.skip:
            yield from blocks[1:]


class CachedSingleBlocks(nn.ModuleList):
    """The single-stream blocks, iterated as: the saved residual added (when skipping), or every block followed
    by the step that keeps their residual."""

    def __init__(self, blocks: nn.ModuleList, state: CacheState):
        super().__init__(blocks)
        self.state = state

    def __iter__(self):
        if self.state.skip:
            yield self.reuse
            return
        yield from super().__iter__()
        yield self.record

    def reuse(self, x: Tensor, vec: Tensor, rope: Tensor, mask: Tensor | None) -> Tensor:
        return x + self.state.tail_residual  # (B, T + N, C): the joint stream as the skipped blocks left it last

    def record(self, x: Tensor, vec: Tensor, rope: Tensor, mask: Tensor | None) -> Tensor:
        self.state.tail_residual = x - self.state.tail_input
        return x


class FirstBlockProbe:
    """Runs double block 0 like the model would, then decides whether this step may skip the others."""

    def __init__(self, block: nn.Module, state: CacheState):
        self.block, self.state = block, state

    def __call__(self, img: Tensor, txt: Tensor, vec: Tensor, rope: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        state = self.state
        new_img, new_txt = self.block(img, txt, vec, rope, mask)
        residual = new_img - img
        state.skip = (state.first_residual is not None and state.tail_residual is not None
                      and relative_change(residual, state.first_residual) < state.threshold)
        if not state.skip:
            state.first_residual = residual
            # What Flux.forward will hand the single blocks if the remaining double blocks were skipped: the
            # reference point of the residual the tail adds (text tokens first, as in the model).
            state.tail_input = torch.cat((new_txt, new_img), dim=1)
        state.steps.append(state.skip)
        return new_img, new_txt


def relative_change(residual: Tensor, reference: Tensor) -> float:
    """mean|residual − reference| / mean|reference|, in fp32, read back to the host (the cache's one sync)."""
    difference = (residual.float() - reference.float()).abs().mean()
    return (difference / reference.float().abs().mean().clamp_min(1e-12)).item()
