"""Sequential block offload: the transformer's weights stay in CPU memory and its blocks visit the device one at a time.

FLUX.1's transformer is 12 billion parameters, 24 GB in bf16, in 57 blocks of 0.3 to 0.7 GB each (19
double-stream, 38 single-stream) and 0.13 GB of embedders and final layer. `offload_blocks` keeps the small
parts on the device and the blocks in CPU memory; each block is copied to the device just before it runs and
dropped just after, so the device holds about two blocks at a time, 1.4 GB at most. On CUDA the copy of block
i + 1 runs on a side stream while block i computes, from pinned memory, so the copy engine and the compute
units work at once (the schedule of DeepSpeed's ZeRO-Inference and of diffusers' group offloading with
streams). Per step the whole transformer crosses PCIe once: 24 GB, about a second at 25 GB/s, which bounds
the step time from below.

It acts on a built model from outside, with forward hooks; the model's code knows nothing of it. Hooks rather
than a wrapper module, because a wrapper would rename every state-dict key (`double_blocks.0.wrapped.img_mod...`)
where the module tree is the checkpoint tree, and because hooks come off without a trace (`BlockOffload.remove`).
The device copies are new `nn.Parameter` objects swapped into each block's parameter table, and swapped out
again after the block ran: the CPU tensors are the masters and are never written, since inference does not
change the weights. Swapping the objects, rather than assigning `param.data`, also works for the `meta`
device, on which the tests watch the weights move.

On a device without streams (the CPU, `meta`) the same code runs with no side stream: `torch.cuda.stream(None)`
is a no-op and there are no events to wait for. On no device does the host wait for the device.
"""

import weakref
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from flux.modules.transformer import Flux

_offloaded: "weakref.WeakSet[Flux]" = weakref.WeakSet()  # models with block offload now, so it is applied once


def offload_blocks(model: Flux, *, device) -> "BlockOffload":
    """Streams `model`'s blocks through `device`; returns the handle whose `remove()` takes the hooks off again.

    The blocks' weights move to CPU memory (pinned when `device` is CUDA), the rest of the model to `device`.
    Each block visits `device` only while it runs, the next one arriving meanwhile; `BlockOffload.resident` says
    which are there. For inference: the weights must not require gradients.
    """
    if model in _offloaded:
        raise ValueError("this model already has block offload; call remove() on its BlockOffload first")
    if any(parameter.requires_grad for parameter in model.parameters()):
        raise ValueError("block offload is for inference: the weights must not require gradients "
                         "(model.requires_grad_(False), as flux's loaders return them)")
    return BlockOffload(model, torch.device(device))


class BlockOffload:
    """The hooks of `offload_blocks`. `blocks` lists the blocks in the order they run (double, then single)."""

    def __init__(self, model: Flux, device: torch.device):
        self.model, self.device = model, device
        self.blocks = [*model.double_blocks, *model.single_blocks]
        # The side stream the copies run on; None where there are no streams.
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # Block index -> ((table, name, CPU master) of each tensor swapped out, the event its copy records).
        self._visits: dict[int, tuple[list[tuple[dict, str, Tensor]], torch.cuda.Event | None]] = {}

        # The small parts move to the device for good; their own tensors are kept, for `remove`. The blocks'
        # move to CPU memory, page-locked for CUDA: only a copy from pinned memory runs asynchronously.
        in_blocks = {id(module) for block in self.blocks for module in block.modules()}
        self._originals = []
        for module in model.modules():
            for table, name, tensor in _tensors([module]):
                if id(module) in in_blocks:
                    master = tensor.to("cpu")
                    _place(table, name, tensor, master.pin_memory() if device.type == "cuda" else master)
                else:
                    self._originals.append((table, name, tensor))
                    _place(table, name, tensor, tensor.to(device))

        self._hooks = [
            # The first block's copy starts with the forward, beside the embedders.
            model.register_forward_pre_hook(lambda module, inputs: self._fetch(0)),
            # After the forward, and after an exception in it, no block is left on the device.
            model.register_forward_hook(lambda module, inputs, output: self._drop_all(), always_call=True),
        ]
        for index, block in enumerate(self.blocks):
            self._hooks += [block.register_forward_pre_hook(lambda module, inputs, index=index: self._arrive(index)),
                            block.register_forward_hook(lambda module, inputs, output, index=index: self._drop(index))]
        _offloaded.add(model)

    @property
    def resident(self) -> list[int]:
        """Indices into `blocks` of the blocks whose weights are on the device now."""
        return sorted(self._visits)

    def remove(self) -> None:
        """Takes the hooks off and puts the small parts' own tensors back; the blocks stay in CPU memory."""
        self._drop_all()
        for hook in self._hooks:
            hook.remove()
        for table, name, original in self._originals:
            table[name] = original
        self._hooks, self._originals = [], []
        _offloaded.discard(self.model)

    def _arrive(self, index: int) -> None:
        """Before block `index` runs: its weights are (or will be, on the device's timeline) there; the next
        block's copy starts."""
        self._fetch(index)
        _, ready = self._visits[index]
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)  # the device waits for the copy, not the host
        if index + 1 < len(self.blocks):
            self._fetch(index + 1)

    def _fetch(self, index: int) -> None:
        """Starts copying block `index` to the device, on the side stream where there is one."""
        if index in self._visits:
            return
        if self.copy_stream is not None:
            # The copy may reuse the device memory of a block dropped a moment ago, which kernels queued on the
            # compute stream can still be reading: it starts after everything queued there so far. (The usual
            # alternative, Tensor.record_stream, would keep that memory from reuse until the host noticed the
            # kernels were done, and the device would hold more blocks the further the host runs ahead.)
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        masters = []
        with torch.cuda.stream(self.copy_stream):
            # Read live, not listed once: tensors added since (a LoRA's) travel with their block too.
            for table, name, master in _tensors(self.blocks[index].modules()):
                table[name] = _like(master, master.to(self.device, non_blocking=True))
                masters.append((table, name, master))
            ready = self.copy_stream.record_event() if self.copy_stream is not None else None
        self._visits[index] = (masters, ready)

    def _drop(self, index: int) -> None:
        """After block `index` ran: its CPU masters back in place, and the device copies freed."""
        masters, _ = self._visits.pop(index)
        for table, name, master in masters:
            table[name] = master

    def _drop_all(self) -> None:
        for index in list(self._visits):
            self._drop(index)


def _tensors(modules: Iterable[nn.Module]) -> list[tuple[dict, str, Tensor]]:
    """(the table holding it, its name, the tensor) for every parameter and buffer of each module, not recursing."""
    return [(table, name, tensor) for module in modules for table in (module._parameters, module._buffers)
            for name, tensor in table.items() if tensor is not None]


def _place(table: dict, name: str, tensor: Tensor, moved: Tensor) -> None:
    if moved is not tensor:  # `.to` returns the tensor itself when it is already there: keep the object
        table[name] = _like(tensor, moved)


def _like(original: Tensor, tensor: Tensor) -> Tensor:
    """`tensor` as the same kind as `original`: a parameter stays a parameter, which state_dict names."""
    if isinstance(original, nn.Parameter):
        return nn.Parameter(tensor, requires_grad=original.requires_grad)
    return tensor
