"""Block offload: the same numbers as without it, at most two blocks on the device, and hooks that come off.

The device the blocks visit is `meta` where the tests watch where the weights are: a tensor's device says
whether it is on the "device" or in CPU memory, which the CPU itself as target could not show. The same code
runs for CUDA, with a side stream and events besides; there is no GPU here to run them on.
"""

import numpy as np
import pytest
import torch
from test_model import random_model, tiny_inputs

from flux.weights import lora
from flux.cli.main import parser
from flux.runtime.offload import offload_blocks
from flux.pipelines.pipeline import Pipeline


def on_meta(module: torch.nn.Module) -> set[bool]:
    """{True} if all of the module's tensors are on the meta device, {False} if none, {True, False} if some."""
    return {tensor.is_meta for tensor in [*module.parameters(), *module.buffers()]}


def meta_inputs(**options):
    return {name: None if value is None else value.to("meta") for name, value in tiny_inputs(**options).items()}


def test_blocks_offload_gives_the_same_image(tiny_snapshot):
    # Bit for bit: the blocks compute on the same weights, only the objects holding them change.
    images = [Pipeline.from_pretrained(tiny_snapshot, device="cpu", dtype=torch.float32, offload=offload)(
        "a red circle", height=32, width=48, seed=5, num_steps=3, output_type="np", progress=False)
        for offload in (False, "blocks")]
    np.testing.assert_array_equal(images[0], images[1])


def test_at_most_two_blocks_are_on_the_device_and_none_between_steps():
    model = random_model().requires_grad_(False)
    offload = offload_blocks(model, device="meta")
    assert all(on_meta(block) == {False} for block in offload.blocks)
    assert on_meta(model.img_in) == on_meta(model.final_layer) == on_meta(model.time_in) == {True}  # the small parts

    seen = []

    def watch(block_index):
        def hook(module, inputs):  # runs after the offload's own pre-hook, just before the block
            assert on_meta(module) == {True}, f"block {block_index} runs with weights not on the device"
            seen.append((block_index, [i for i, block in enumerate(offload.blocks) if True in on_meta(block)]))
            assert seen[-1][1] == offload.resident
        return hook

    for index, block in enumerate(offload.blocks):
        block.register_forward_pre_hook(watch(index))
    with torch.no_grad():
        for step in range(2):
            model(**meta_inputs())
            assert all(on_meta(block) == {False} for block in offload.blocks) and offload.resident == []
    # Five blocks (TINY: two double, three single), each with the next one arriving beside it.
    assert seen == 2 * [(0, [0, 1]), (1, [1, 2]), (2, [2, 3]), (3, [3, 4]), (4, [4])]


def test_an_exception_in_a_block_leaves_no_block_on_the_device():
    model = random_model().requires_grad_(False)
    offload = offload_blocks(model, device="meta")

    def fail(module, inputs):
        raise RuntimeError("out of memory, say")

    model.single_blocks[0].register_forward_pre_hook(fail)
    with torch.no_grad(), pytest.raises(RuntimeError, match="out of memory"):
        model(**meta_inputs())
    assert offload.resident == [] and all(on_meta(block) == {False} for block in offload.blocks)


def test_a_lora_added_after_offload_travels_with_its_block():
    model = random_model().requires_grad_(False)
    offload = offload_blocks(model, device="meta")
    lora.add_lora(model, rank=2, targets=["double_blocks.*.img_attn.qkv", "single_blocks.*.linear2"])
    seen = []
    for block in offload.blocks:
        block.register_forward_pre_hook(lambda module, inputs: seen.append(on_meta(module)))
    with torch.no_grad():
        model(**meta_inputs())
    assert seen == [{True}] * len(offload.blocks)  # the LoRA's tensors as well as the block's
    assert on_meta(model.double_blocks[0].img_attn.qkv.lora) == {False}  # and back in CPU memory with its block


def test_remove_takes_the_hooks_off_and_leaves_the_model_as_it_was():
    model = random_model().requires_grad_(False)
    inputs = tiny_inputs()
    with torch.no_grad():
        expected = model(**inputs)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    small_parts = [model.img_in.weight, model.final_layer.linear.bias]
    hooks = {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()}

    offload = offload_blocks(model, device="cpu")
    assert list(model.state_dict()) == list(before)  # the keys, in their order, while it is on
    with pytest.raises(ValueError, match="already has block offload"):
        offload_blocks(model, device="cpu")
    with torch.no_grad():
        assert torch.equal(model(**inputs), expected)
    offload.remove()

    assert {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()} == hooks
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[name], before[name]) for name in before)
    assert model.img_in.weight is small_parts[0] and model.final_layer.linear.bias is small_parts[1]
    offload_blocks(model, device="cpu").remove()  # and it can be put on again


def test_trainable_weights_are_refused():
    with pytest.raises(ValueError, match="block offload is for inference"):
        offload_blocks(random_model(), device="cpu")


def test_the_pipeline_offload_modes(tiny_snapshot):
    ours = Pipeline.from_pretrained(tiny_snapshot, device="cpu", dtype=torch.float32)
    components = dict(model=ours.model, ae=ours.ae, t5=ours.t5, clip=ours.clip, defaults=ours.defaults)
    # "model" (and True, its old name) leaves every weight in CPU memory until a component runs...
    for offload in (True, "model"):
        pipe = Pipeline(**components, device="meta", offload=offload)
        assert pipe.offload == "model" and on_meta(pipe.model) == {False}
    # ... "blocks" puts the transformer's small parts on the device for good, and its blocks stay behind.
    pipe = Pipeline(**components, device="meta", offload="blocks")
    assert on_meta(pipe.model.img_in) == {True} and on_meta(pipe.model.double_blocks) == {False}
    assert on_meta(pipe.t5) == on_meta(pipe.ae) == {False}


@pytest.mark.parametrize("offload", ["block", "Model", 1, 0, None, "yes"])
def test_a_bad_offload_value_is_refused_before_loading(offload, tmp_path):
    message = r"offload must be False, True, 'model' or 'blocks', got "
    with pytest.raises(ValueError, match=message):
        Pipeline.from_pretrained(tmp_path / "not-there", offload=offload)  # the offload error, not a missing folder
    with pytest.raises(ValueError, match=message):
        Pipeline(model=None, ae=None, t5=None, clip=None, defaults=None, offload=offload)


def test_the_command_line_offload_option(capsys):
    def offload(*options):
        return parser().parse_args(["generate", "a cat", *options]).offload

    assert (offload(), offload("--offload"), offload("--offload", "model"), offload("--offload", "blocks")) == (
        False, "model", "model", "blocks")
    with pytest.raises(SystemExit) as exit:
        offload("--offload", "layers")
    assert exit.value.code == 2 and "invalid choice: 'layers'" in capsys.readouterr().err
