"""Fuzzing the repository-level JSON files of flux/pipelines/pipeline.py: scheduler/scheduler_config.json and
flux_defaults.json (the sampling defaults) and model_index.json.

Defaults that load must be usable: they pass the pipeline's own request checks and give a finite, decreasing
schedule from 1 to 0.
"""

import json
import math
from dataclasses import asdict

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flux.modules.configs import configs
from flux.pipelines.pipeline import Pipeline
from flux.pipelines.requests import check_request
from flux.pipelines.snapshots import sampling_defaults
from flux.pipelines.sampling import get_schedule
from fuzzing import bounded, case_folder, fuzz_settings, mutated_json_file, outcome


@pytest.mark.parametrize("file", ["scheduler/scheduler_config.json", "flux_defaults.json"])
@given(data=st.data())
@fuzz_settings(ci_examples=40)
def test_sampling_defaults(tiny_snapshot, tmp_path, file, data):
    if file == "flux_defaults.json":
        seed = asdict(configs["flux-dev"].sampling)
    else:
        seed = json.loads((tiny_snapshot / file).read_text())
    with case_folder(tmp_path) as root:
        (root / "scheduler").mkdir()
        (root / file).write_bytes(data.draw(mutated_json_file(seed)))
        guidance_embed = data.draw(st.booleans())
        defaults = outcome(lambda: sampling_defaults(root, guidance_embed=guidance_embed), names=[root / file])
        if defaults is not None:
            with bounded():
                check_request(["a cat"], width=defaults.image_size, height=defaults.image_size,
                              num_steps=defaults.num_steps, max_sequence_length=defaults.max_sequence_length)
                image_tokens = (defaults.image_size // 16) ** 2
                times = get_schedule(defaults.num_steps, image_tokens, shift=defaults.shift_schedule,
                                     base_shift=defaults.base_shift, max_shift=defaults.max_shift)
            assert times[0] == 1 and times[-1] == 0 and all(a >= b for a, b in zip(times, times[1:]))
            assert defaults.guidance is None or math.isfinite(defaults.guidance)


@given(data=st.data())
@fuzz_settings(ci_examples=3)
def test_model_index(tiny_snapshot, tmp_path, data):
    """diffusers' description of the repository: flux does not need it, so no content of it may break loading.
    The rest of the snapshot is linked in, as the Hugging Face cache links its files."""
    with case_folder(tmp_path) as root:
        for entry in tiny_snapshot.iterdir():
            if entry.name != "model_index.json":
                (root / entry.name).symlink_to(entry)
        seed = json.loads((tiny_snapshot / "model_index.json").read_text())
        (root / "model_index.json").write_bytes(data.draw(mutated_json_file(seed)))
        pipeline = outcome(lambda: Pipeline.from_pretrained(root, device="cpu", dtype=torch.float32), names=[root])
        assert pipeline is not None, "model_index.json is not read, so nothing in it can make loading fail"
