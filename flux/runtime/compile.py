"""torch.compile for the FLUX.1 transformer, one block at a time ("regional" compilation).

Nearly all of a step's time is in the 19 double-stream and 38 single-stream blocks; the embedders, the final
layer and the glue between blocks are under 1% of the work. `compile_blocks` compiles the blocks and leaves the
rest eager, which costs little and buys three things:

- Compile time of two blocks, not of the model. Dynamo caches compiled code per Python code object and guards
  on the module's type and its tensors' dtypes, devices and shapes, not on which block it is: the 19 double
  blocks share one compiled graph and the 38 single blocks another (tests/test_compile.py counts them).
  Compiling `Flux.forward` whole would unroll all 57 blocks into one graph and compile each of them.
- fullgraph=True: a graph break inside a block, a silent slowdown otherwise, is an error at the first call.
- Hooks stay outside the compiled code. The block's `forward` is what is compiled, not its `__call__` (what
  `nn.Module.compile` compiles), so forward hooks, such as flux/runtime/offload.py's, which move weights and queue work
  on CUDA streams, run eagerly around each compiled block. Hooks inside the block (a LoRA's, on its Linears)
  are traced with it.

`dynamic=None` is dynamo's default: the first image size compiles specialised; a second size compiles once more
with the sequence lengths symbolic, and every later size reuses that. `mode="reduce-overhead"` (CUDA graphs)
records the weights' addresses, so it does not combine with block offload, whose weights move every step.
"""

import torch

from flux.modules.transformer import Flux


def compile_blocks(model: Flux, *, backend: str = "inductor", mode: str | None = None,
                   dynamic: bool | None = None) -> None:
    """Compiles the forward of every double- and single-stream block of `model` in place, with fullgraph=True.

    The state dict is unchanged (the compiled function is an instance attribute `forward`, not a module), and
    `backend`, `mode` and `dynamic` are torch.compile's. The first call at each new size compiles.
    """
    blocks = [*model.double_blocks, *model.single_blocks]
    if any("forward" in vars(block) for block in blocks):
        raise ValueError("the blocks of this model are already compiled (or have their own forward)")
    for block in blocks:
        block.forward = torch.compile(block.forward, fullgraph=True, backend=backend, mode=mode, dynamic=dynamic)
