"""flux.weights.pages: giving back the pages of memory-mapped weights frees memory and loses nothing.

"Nothing lost" is checked against the values themselves, copied out before the release (and, for written
tensors, the write itself); "memory freed" against the kernel's own count of the process's resident
file-backed pages (RssFile in /proc/self/status).
"""

import pytest
import torch
from safetensors.torch import save_file

import flux.pipelines.pipeline as pipeline_module
from flux import Pipeline
from flux.pipelines.snapshots import builtin_model
from flux.weights.checkpoint import read_safetensors
from flux.weights.int8 import quantize_int8
from flux.weights.loading import load_flow_model
from flux.weights.pages import PAGE, pages_supported, release_pages, resident_bytes

pytestmark = pytest.mark.skipif(not pages_supported(), reason="releasing mapped pages needs Linux's /proc/self/pagemap")

MIB = 1 << 20


def resident_file_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("RssFile:"))
    return int(line.split()[1]) * 1024


@pytest.fixture
def mapped(tmp_path):
    """Three tensors written with the safetensors library and read back as views of our private map."""
    tensors = {"a": torch.randn(1024, 1024), "b": torch.randn(512, 1024), "small": torch.randn(10)}
    save_file(tensors, tmp_path / "w.safetensors")
    return read_safetensors(tmp_path / "w.safetensors"), tensors


def test_release_gives_back_resident_pages_and_the_values_come_back(mapped):
    views, originals = mapped
    for view in views.values():
        view.sum()  # reads every page: now resident
    before = resident_file_bytes()
    released = release_pages(views.values())
    dropped = before - resident_file_bytes()
    # a and b hold 6 MiB; each keeps its two partial end pages (shared with a neighbour); "small" is one page.
    assert released >= 6 * MIB - 4 * PAGE, released
    # RssFile also moves with whatever else the process maps meanwhile (a library page or two): a margin.
    assert dropped >= 5 * MIB, (dropped, released)
    for name, view in views.items():  # mapped again on reading, from the page cache: the same bytes
        assert torch.equal(view, originals[name]), name


def test_pages_written_in_place_are_kept(mapped):
    views, originals = mapped
    a = views["a"]
    a[100:200] = 7.0  # 100 rows of 4 KiB: private copies of about 100 pages (copy-on-write)
    expected = a.clone()
    a.sum()
    released = release_pages([a])
    # Without the pagemap check, MADV_DONTNEED would drop the private copies and rows 100-199 would read the
    # file's values again.
    assert torch.equal(a, expected)
    assert not torch.equal(a, originals["a"])
    # The other pages of `a` (4 MiB less the written ones and the two ends) were released all the same.
    assert released >= 4 * MIB - 102 * PAGE - 2 * PAGE, released


def test_tensors_outside_file_maps_are_left_alone():
    x = torch.randn(1024, 1024)
    y = x.clone()
    assert release_pages([x, torch.empty(0), x[:, 3]]) == 0
    assert torch.equal(x, y)


def test_pipeline_release_pages_gives_the_same_image_and_releases_each_block(monkeypatch):
    # fp32 from the built-in model's fp32 files: its weights are views of the files, as bf16 FLUX.1 in bf16 is.
    calls = []

    def counting(tensors):
        calls.append(release_pages(tensors))
        return calls[-1]

    plain = Pipeline.from_pretrained(builtin_model(), device="cpu", dtype=torch.float32)
    expected = plain("a small red circle at the top of a blue background", seed=0, num_steps=2, output_type="pt",
                     progress=False)
    monkeypatch.setattr(pipeline_module, "release_pages", counting)
    lean = Pipeline.from_pretrained(builtin_model(), device="cpu", dtype=torch.float32, release_pages=True)
    image = lean("a small red circle at the top of a blue background", seed=0, num_steps=2, output_type="pt",
                 progress=False)
    # The same kernels on the same bytes: exactly equal.
    assert torch.equal(image, expected)
    blocks = len(lean.model.double_blocks) + len(lean.model.single_blocks)
    assert len(calls) == 2 + 2 * blocks  # T5 and CLIP after encoding, then every block at each of 2 steps
    assert all(released > 0 for released in calls[2:]), calls  # each block's pages were resident after it ran


def test_release_pages_must_be_a_bool():
    with pytest.raises(ValueError, match="release_pages must be True or False"):
        Pipeline.from_pretrained(builtin_model(), device="cpu", dtype=torch.float32, release_pages="yes")


def test_quantize_int8_gives_back_the_pages_of_the_weights_it_replaces():
    model = load_flow_model(builtin_model(), dtype=torch.float32)  # fp32 file, fp32 model: views of the file
    replaced = model.double_blocks[0].img_mlp[0].weight  # kept alive here, so its pages could stay mapped
    kept = model.double_blocks[0].img_mod.lin.weight  # the modulation stays in fp32 (flux/weights/int8.py)
    kept.sum()
    quantize_int8(model)
    # Quantizing read every page of `replaced`; without the release they would be resident still.
    assert replaced.numel() * 4 >= 16 * PAGE and resident_bytes([replaced]) == 0
    assert resident_bytes([kept]) > 0  # what it did not replace it leaves alone
