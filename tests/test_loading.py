"""Loading the transformer, checked against diffusers' `FluxTransformer2DModel` as the independent reference.

Both ways round: (a) diffusers' own model saved in its own layout, read by our key conversion; (b) random
weights in the official layout, read by us and by diffusers' own single-file converter. The same inputs
must then give the same velocity.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux import CheckpointError, load_flow_model
from flux.modules.configs import TINY
from flux.modules.transformer import Flux

diffusers = pytest.importorskip("diffusers")


def diffusers_model(params, seed=0):
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=params.in_channels, num_layers=params.depth,
        num_single_layers=params.depth_single_blocks, attention_head_dim=params.head_dim,
        num_attention_heads=params.num_heads, joint_attention_dim=params.context_in_dim,
        pooled_projection_dim=params.vec_in_dim, guidance_embeds=params.guidance_embed,
        axes_dims_rope=params.axes_dim,
    ).eval()
    with torch.no_grad():  # diffusers' initialisation, then noise everywhere so no zero layer hides a path
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(params, batch=2, height=3, width=5, text=7, seed=0):
    """Non-square latents, batch > 1, a text length other than 256."""
    generator = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None]
    return dict(
        img=torch.randn(batch, height * width, params.in_channels, generator=generator),
        img_ids=img_ids.reshape(-1, 3),
        txt=torch.randn(batch, text, params.context_in_dim, generator=generator),
        txt_ids=torch.zeros(text, 3),
        timesteps=torch.rand(batch, generator=generator),
        y=torch.randn(batch, params.vec_in_dim, generator=generator),
        guidance=torch.linspace(1.0, 4.0, batch) if params.guidance_embed else None,
    )


def run_ours(model, x):
    batch = x["img"].shape[0]
    with torch.no_grad():
        return model(x["img"], x["img_ids"].expand(batch, -1, -1), x["txt"], x["txt_ids"].expand(batch, -1, -1),
                     x["timesteps"], x["y"], x["guidance"])


def run_diffusers(model, x):
    # diffusers takes 2-D ids and t in [0, 1] (it multiplies by 1000 itself), like the official model.
    with torch.no_grad():
        return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                     timestep=x["timesteps"], img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"],
                     return_dict=False)[0]


def relative_error(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


SCHNELL_LIKE, DEV_LIKE = TINY, replace(TINY, guidance_embed=True)


@pytest.mark.parametrize("params", [SCHNELL_LIKE, DEV_LIKE], ids=["schnell-like", "dev-like"])
def test_diffusers_folder_loads_through_our_conversion(params, tmp_path):
    reference = diffusers_model(params)
    reference.save_pretrained(tmp_path, max_shard_size="3MB")  # sharded, with an index
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ours = load_flow_model(tmp_path, dtype=torch.float32)
    x = inputs(params)
    error = relative_error(run_ours(ours, x), run_diffusers(reference, x))
    assert error <= 1e-5, f"fp32 max relative error {error:.2e}"


def test_bf16_matches_within_bf16_rounding(tmp_path):
    reference = diffusers_model(DEV_LIKE)
    reference.save_pretrained(tmp_path)
    ours = load_flow_model(tmp_path, dtype=torch.bfloat16)
    x = inputs(DEV_LIKE)
    truth = run_diffusers(reference, x)  # fp32
    x16 = {k: v.bfloat16() if v is not None else v for k, v in x.items()}
    ours_out, theirs_out = run_ours(ours, x16).float(), run_diffusers(reference.bfloat16(), x16).float()

    def rms_error(a, b):
        return ((a - b).norm() / b.norm()).item()

    # Both bf16 runs sit ~15 % (RMS) from the fp32 truth, mostly because 1000·t is formed in bf16 (3
    # significant digits) as in the official sampler; they agree with each other to ~1 %. A wrong
    # computation (a swapped shift/scale, a missing rotation) differs by tens of percent.
    assert rms_error(ours_out, theirs_out) <= 2e-2, f"bf16 RMS difference from diffusers' bf16 run {rms_error(ours_out, theirs_out):.2e}"
    assert rms_error(ours_out, truth) <= 1.1 * rms_error(theirs_out, truth) + 1e-3


def official_layout_weights(params, seed=0):
    """Random weights under the official names (the manifest test proves our names are those)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        names = Flux(params).state_dict()
    return {name: torch.randn(t.shape, generator=generator) * (0.02 if t.ndim > 1 else 0.1) for name, t in names.items()}


def test_official_layout_at_real_width_matches_diffusers_single_file_conversion(tmp_path):
    # diffusers' converter assumes the real width (3072); one block of each kind keeps this to ~2 GB.
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    params = replace(DEV_LIKE, hidden_size=3072, num_heads=24, depth=1, depth_single_blocks=1)
    path = tmp_path / "flux1-test.safetensors"
    save_file(official_layout_weights(params), path)
    ours = load_flow_model(path, dtype=torch.float32)
    with torch.device("meta"):
        reference = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=params.context_in_dim,
            pooled_projection_dim=params.vec_in_dim, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    reference.load_state_dict(convert_flux_transformer_checkpoint_to_diffusers(load_file(path)), strict=True, assign=True)
    x = inputs(params, batch=2, height=4, width=3, text=5)
    error = relative_error(run_ours(ours, x), run_diffusers(reference.eval(), x))
    assert error <= 1e-5, f"fp32 max relative error {error:.2e}"


def test_prefixed_bundle_and_fp8_files_load(tmp_path):
    weights = official_layout_weights(SCHNELL_LIKE)
    save_file({**{f"model.diffusion_model.{k}": v for k, v in weights.items()}, "vae.decoder.conv_in.weight": torch.zeros(1)},
              tmp_path / "bundle.safetensors")
    loaded = load_flow_model(tmp_path / "bundle.safetensors", dtype=torch.float32).state_dict()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)

    save_file({k: v.to(torch.float8_e4m3fn) for k, v in weights.items()}, tmp_path / "fp8.safetensors")
    loaded = load_flow_model(tmp_path / "fp8.safetensors", dtype=torch.bfloat16).state_dict()
    assert all(loaded[k].dtype == torch.bfloat16 for k in loaded)
    assert all(torch.equal(loaded[k], weights[k].to(torch.float8_e4m3fn).to(torch.bfloat16)) for k in weights)


def test_snapshot_prefers_the_single_file(tmp_path):
    single = official_layout_weights(SCHNELL_LIKE, seed=1)
    save_file(single, tmp_path / "flux1-schnell.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "ae.safetensors")
    diffusers_model(SCHNELL_LIKE).save_pretrained(tmp_path / "transformer")
    loaded = load_flow_model(tmp_path, dtype=torch.float32).state_dict()
    assert torch.equal(loaded["img_in.weight"], single["img_in.weight"])
    (tmp_path / "flux1-schnell.safetensors").unlink()  # then the diffusers folder is used
    assert not torch.equal(load_flow_model(tmp_path, dtype=torch.float32).state_dict()["img_in.weight"], single["img_in.weight"])


def test_config_is_inferred_for_other_depths_and_channels(tmp_path):
    params = replace(TINY, in_channels=128, depth=1, depth_single_blocks=2, guidance_embed=True)  # Fill-like input
    save_file(official_layout_weights(params), tmp_path / "fill.safetensors")
    assert load_flow_model(tmp_path / "fill.safetensors").params == params


# --------------------------------------------------------------------------------------------------
# Errors: each names the file (and the tensor) and says what to do.
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def official_file(tmp_path):
    path = tmp_path / "flux1-tiny.safetensors"
    save_file(official_layout_weights(SCHNELL_LIKE), path)
    return path


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere.safetensors: not found.*weights/README.md"):
        load_flow_model(tmp_path / "nowhere.safetensors")


def test_folder_without_a_transformer(tmp_path):
    with pytest.raises(CheckpointError, match=r"no FLUX transformer here"):
        load_flow_model(tmp_path)


def test_not_a_safetensors_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip (a pickled .ckpt), not safetensors" * 10)
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a safetensors file"):
        load_flow_model(tmp_path / "model.safetensors")


def test_truncated_file(official_file):
    data = official_file.read_bytes()
    official_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"flux1-tiny.safetensors: tensor '.*'.*truncated or corrupt"):
        load_flow_model(official_file)


def test_missing_tensor(official_file):
    weights = load_file(official_file)
    del weights["double_blocks.1.txt_mlp.2.bias"]
    save_file(weights, official_file)
    with pytest.raises(CheckpointError, match=r"flux1-tiny.safetensors: missing 1 tensor.*'double_blocks.1.txt_mlp.2.bias'"):
        load_flow_model(official_file)


def test_unexpected_tensor(official_file):
    save_file({**load_file(official_file), "double_blocks.0.extra.weight": torch.zeros(2)}, official_file)
    with pytest.raises(CheckpointError, match=r"flux1-tiny.safetensors: 1 unexpected tensor.*'double_blocks.0.extra.weight'"):
        load_flow_model(official_file)


def test_wrong_shape(official_file):
    weights = load_file(official_file)
    weights["single_blocks.2.linear2.weight"] = weights["single_blocks.2.linear2.weight"][:, :-1].contiguous()
    save_file(weights, official_file)
    with pytest.raises(CheckpointError, match=r"tensor 'single_blocks.2.linear2.weight' has shape \(384, 1919\), the model expects \(384, 1920\)"):
        load_flow_model(official_file)


def sharded_folder(tmp_path):
    diffusers_model(SCHNELL_LIKE).save_pretrained(tmp_path, max_shard_size="3MB")
    index_path = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    return index_path, json.loads(index_path.read_text())


def test_missing_shard(tmp_path):
    index_path, index = sharded_folder(tmp_path)
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"index.json: shard '{shard}' is missing"):
        load_flow_model(tmp_path)


@pytest.mark.parametrize("evil", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_shard_outside_the_folder_is_refused(tmp_path, evil):
    index_path, index = sharded_folder(tmp_path)
    index["weight_map"]["x_embedder.weight"] = evil
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"is outside the index's folder; refusing"):
        load_flow_model(tmp_path)


# --------------------------------------------------------------------------------------------------
# Memory: a bf16 file into a bf16 model holds the weights once.
# --------------------------------------------------------------------------------------------------

MEASURE = """
import sys, torch
from flux import load_flow_model
def status(key):  # kB, from the kernel's own accounting (file-backed pages included)
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])
before = status("VmRSS")
model = load_flow_model(sys.argv[1], dtype=torch.bfloat16)
total = sum(p.float().sum().item() for p in model.parameters())  # touch every byte of every weight
print((status("VmHWM") - before) * 1024)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_peak_memory_while_loading_is_close_to_the_file_size(tmp_path):
    params = replace(TINY, hidden_size=1024, num_heads=8, depth=2, depth_single_blocks=4)
    path = tmp_path / "flux1-bf16.safetensors"
    save_file({k: v.bfloat16() for k, v in official_layout_weights(params).items()}, path)
    size = path.stat().st_size  # ≈ 270 MB
    env = dict(os.environ, OMP_NUM_THREADS="1")
    grown = int(subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True,
                               check=True, env=env).stdout.split()[-1])
    # One copy is the file's size; a loader that staged a second copy (or fp32) would need ≥ 2×.
    assert grown < 1.3 * size, f"peak RSS grew by {grown / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file"


def test_text_encoders_load_without_importing_torch_dynamo(tiny_snapshot):
    """nn.Embedding's random init on `meta` imports torch._dynamo (a second or more); the loaders skip it,
    and leave nn.Embedding initialising as usual afterwards."""
    script = """
import sys, torch
from flux import load_clip, load_t5
load_t5(sys.argv[1], dtype=torch.float32), load_clip(sys.argv[1], dtype=torch.float32)
print("torch._dynamo" in sys.modules, torch.nn.Embedding(4, 3).weight.abs().sum().item() > 0)
"""
    result = subprocess.run([sys.executable, "-c", script, str(tiny_snapshot)], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "True"], result.stdout + result.stderr
