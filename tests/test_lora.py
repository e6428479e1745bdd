"""LoRA, checked against diffusers + PEFT as the independent reference, and against hand-merged weights.

A diffusers `FluxTransformer2DModel` with random weights is the base; ours is loaded from its folder by
the (separately tested) diffusers conversion. A LoRA file loaded by diffusers' own `FluxPipeline` and by
`load_lora` must then give the same velocity; the other layouts must give the same output as the merged
weights their format descriptions imply, written out by hand here.
"""

import copy

import pytest
import torch
from safetensors.torch import save_file

from flux import CheckpointError, load_flow_model
from flux.modules.configs import TINY
from flux.weights.lora import DEFAULT_TARGETS, add_lora, load_lora, save_lora, unload_lora

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' LoRA loading runs on PEFT

C, M = TINY.hidden_size, TINY.mlp_hidden_dim  # 384, 1536: linear1 has 3C + M = 2688 rows


# --------------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """diffusers' model with random weights everywhere, and the folder it is saved in (our model's source)."""
    torch.manual_seed(0)
    reference = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=TINY.in_channels, num_layers=TINY.depth, num_single_layers=TINY.depth_single_blocks,
        attention_head_dim=TINY.head_dim, num_attention_heads=TINY.num_heads, joint_attention_dim=TINY.context_in_dim,
        pooled_projection_dim=TINY.vec_in_dim, guidance_embeds=False, axes_dims_rope=TINY.axes_dim).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("transformer")
    reference.save_pretrained(folder)
    return reference, folder


def ours(base):
    return load_flow_model(base[1], dtype=torch.float32)


def inputs(batch=2, height=3, width=5, text=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None]
    return dict(img=torch.randn(batch, height * width, TINY.in_channels, generator=generator),
                img_ids=img_ids.reshape(-1, 3), txt=torch.randn(batch, text, TINY.context_in_dim, generator=generator),
                txt_ids=torch.zeros(text, 3), timesteps=torch.rand(batch, generator=generator),
                y=torch.randn(batch, TINY.vec_in_dim, generator=generator))


def run_ours(model, x):
    batch = x["img"].shape[0]
    with torch.no_grad():
        return model(x["img"], x["img_ids"].expand(batch, -1, -1), x["txt"], x["txt_ids"].expand(batch, -1, -1),
                     x["timesteps"], x["y"])


def run_diffusers(model, x):
    with torch.no_grad():
        return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                     timestep=x["timesteps"], img_ids=x["img_ids"], txt_ids=x["txt_ids"], return_dict=False)[0]


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def load_into_diffusers(reference, path):
    """diffusers' user-facing path: a pipeline's load_lora_weights (the transformer is all it needs here)."""
    reference = copy.deepcopy(reference)
    pipeline = diffusers.FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                      text_encoder_2=None, tokenizer_2=None, transformer=reference)
    pipeline.load_lora_weights(str(path))
    return reference


def random_diffusers_lora(reference, seed=0):
    """A LoRA on every Linear of diffusers' model, in diffusers' layout (`transformer.` + its module names,
    PEFT's lora_A/lora_B, an `.alpha` each), B nonzero. Ranks cycle through 2, 3, 4, so q, k and v of one
    fused projection differ; alpha is 2·rank (scale 2), except that the q, k, v and MLP-input layers of
    single block 0 get alpha = rank + 1 (scales that differ within our fused linear1). Every `proj_out`
    gets rank 4 and alpha 8: PEFT matches alpha patterns by name suffix, so `proj_out` must not differ
    from `single_transformer_blocks.N.proj_out`."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    linears = [(name, m) for name, m in reference.named_modules() if isinstance(m, torch.nn.Linear)]
    for index, (name, linear) in enumerate(linears):
        rank = 4 if name.endswith("proj_out") else (2, 3, 4)[index % 3]
        alpha = rank + 1 if name.startswith("single_transformer_blocks.0.") and "proj_out" not in name else 2 * rank
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=generator) * 0.05
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=generator) * 0.05
        tensors[f"transformer.{name}.alpha"] = torch.tensor(float(alpha))
    return tensors


@pytest.fixture(scope="module")
def lora_file(base, tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "diffusers.safetensors"
    save_file(random_diffusers_lora(base[0]), path)
    return path


def updates(model):
    """Every LoRA update of `model` as (module, start, A, B, scale·strength), in a fixed order."""
    return [(name, u.start, u.A.detach(), u.B.detach(), u.scale * u.strength)
            for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and hasattr(m, "lora")
            for u in m.lora.updates]


def assert_same_updates(got, expected):
    assert [(n, s, A.shape, B.shape) for n, s, A, B, _ in got] == [(n, s, A.shape, B.shape) for n, s, A, B, _ in expected]
    for (name, _, A, B, scale), (_, _, A0, B0, scale0) in zip(got, expected):
        assert torch.equal(A, A0) and torch.equal(B, B0), f"{name}: tensors changed"
        assert scale == pytest.approx(scale0, rel=1e-6), f"{name}: scale {scale} != {scale0}"


# --------------------------------------------------------------------------------------------------
# Parity with diffusers + PEFT
# --------------------------------------------------------------------------------------------------

def test_diffusers_file_matches_diffusers(base, lora_file):
    x = inputs()
    reference = load_into_diffusers(base[0], lora_file)
    model = ours(base)
    without = run_ours(model, x)
    load_lora(model, lora_file)
    expected = run_diffusers(reference, x)
    error = relative_error(run_ours(model, x), expected)
    assert error <= 1e-5, f"fp32 max relative error {error:.2e}"
    assert relative_error(without, expected) > 1e-2, "the LoRA hardly changes the output: the test could not fail"


def test_our_diffusers_file_loads_in_diffusers(base, tmp_path):
    # An adapter of ours on every Linear, the final layer's swapped halves and fused q, k, v included.
    model = ours(base)
    add_lora(model, rank=3, alpha=4.5, targets=("*",))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.copy_(torch.randn_like(p) * 0.05)
    save_lora(model, tmp_path / "ours.safetensors", format="diffusers")
    x = inputs()
    error = relative_error(run_ours(model, x), run_diffusers(load_into_diffusers(base[0], tmp_path / "ours.safetensors"), x))
    assert error <= 1e-5, f"fp32 max relative error {error:.2e}"


def test_peft_adapter_config_gives_alpha(base, tmp_path):
    # diffusers' save_lora_adapter writes no `.alpha` tensors: alpha lives in PEFT's config in the metadata.
    from peft import LoraConfig

    reference = copy.deepcopy(base[0])
    reference.add_adapter(LoraConfig(r=4, lora_alpha=12, alpha_pattern={"x_embedder": 2}, init_lora_weights=False,
                                     target_modules=["to_q", "add_v_proj", "proj_mlp", "x_embedder", "norm_out.linear"]))
    reference.save_lora_adapter(tmp_path)
    model = ours(base)
    load_lora(model, tmp_path / "pytorch_lora_weights.safetensors")
    x = inputs()
    error = relative_error(run_ours(model, x), run_diffusers(reference, x))
    assert error <= 1e-5, f"fp32 max relative error {error:.2e}"


# --------------------------------------------------------------------------------------------------
# Our formats: conversion and round trips
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("format", ["kohya", "bfl"])
def test_converted_lora_gives_the_same_output(base, lora_file, format, tmp_path):
    x = inputs()
    source = ours(base)
    load_lora(source, lora_file)
    save_lora(source, tmp_path / "converted.safetensors", format=format)
    model = ours(base)
    load_lora(model, tmp_path / "converted.safetensors")
    error = relative_error(run_ours(model, x), run_ours(source, x))
    # The same update, but a fused qkv pair is one product where diffusers' layout had three: fp32 rounding.
    assert error <= 1e-5, f"fp32 max relative error {error:.2e}"
    # q, k, v of double block 0 share scale 2: written as one block-diagonal pair, read back as the three.
    block = [u for u in updates(model) if u[0] == "double_blocks.0.img_attn.qkv"]
    assert_same_updates(block, [u for u in updates(source) if u[0] == "double_blocks.0.img_attn.qkv"])


@pytest.mark.parametrize("format", ["diffusers", "kohya", "bfl"])
def test_round_trip_keeps_tensors(base, format, tmp_path):
    model = ours(base)
    add_lora(model, rank=4, alpha=6.0, targets=("*",))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.copy_(torch.randn_like(p))
    save_lora(model, tmp_path / "lora.safetensors", format=format)
    loaded = ours(base)
    load_lora(loaded, tmp_path / "lora.safetensors")
    assert_same_updates(updates(loaded), updates(model))


def test_diffusers_file_round_trip_keeps_tensors(base, lora_file, tmp_path):
    model = ours(base)
    load_lora(model, lora_file)
    save_lora(model, tmp_path / "again.safetensors", format="diffusers")
    loaded = ours(base)
    load_lora(loaded, tmp_path / "again.safetensors")
    assert_same_updates(updates(loaded), updates(model))


def test_stacked_loras_save_combined(base, lora_file, tmp_path):
    x = inputs()
    model = ours(base)
    load_lora(model, lora_file, strength=0.5)
    load_lora(model, lora_file, strength=0.25)
    with pytest.raises(ValueError, match="several LoRAs"):
        save_lora(model, tmp_path / "stacked.safetensors", format="diffusers")
    save_lora(model, tmp_path / "stacked.safetensors", format="kohya")
    single = ours(base)
    load_lora(single, tmp_path / "stacked.safetensors")
    error = relative_error(run_ours(single, x), run_ours(model, x))
    # Two stacked pairs against their concatenation, one product of rank 2r: fp32 rounding of other sums.
    assert error <= 1e-5, f"fp32 max relative error {error:.2e}"


# --------------------------------------------------------------------------------------------------
# Strength, unloading, training
# --------------------------------------------------------------------------------------------------

def test_strength_scales_each_layers_update_linearly(base, lora_file):
    model = ours(base)
    layers = {name: model.get_submodule(name) for name in
              ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.0", "single_blocks.0.linear1", "single_blocks.2.linear2"]}
    x_of = {name: torch.randn(2, 5, layer.in_features) for name, layer in layers.items()}

    def outputs():
        with torch.no_grad():
            return {name: layer(x_of[name]) for name, layer in layers.items()}

    plain = outputs()
    load_lora(model, lora_file, strength=1.0)
    full = outputs()
    unload_lora(model)
    load_lora(model, lora_file, strength=0.37)
    for name, y in outputs().items():
        expected = plain[name] + 0.37 * (full[name] - plain[name])
        assert relative_error(y, expected) <= 1e-5, name
    unload_lora(model)
    load_lora(model, lora_file, strength=0.0)
    assert run_ours(model, inputs()).equal(run_ours(ours(base), inputs())), "strength 0 must add exactly nothing"


def test_unload_restores_the_model_bit_for_bit(base, lora_file):
    model = ours(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    output = run_ours(model, inputs())
    load_lora(model, lora_file, strength=0.8)
    assert not run_ours(model, inputs()).equal(output)
    unload_lora(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert run_ours(model, inputs()).equal(output)


def test_a_training_step_changes_only_the_lora(base):
    model = ours(base)  # loaded frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    output = run_ours(model, inputs())
    parameters = add_lora(model, rank=4, alpha=8.0, targets=DEFAULT_TARGETS)
    assert len(parameters) == 2 * (4 * TINY.depth * 2 + 2 * TINY.depth_single_blocks)
    assert run_ours(model, inputs()).equal(output), "B starts at zero: the output must not change"
    A0 = [p.clone() for p in parameters[0::2]]
    optimizer = torch.optim.SGD(parameters, lr=1e-2)
    x = inputs()
    loss = model(x["img"], x["img_ids"].expand(2, -1, -1), x["txt"], x["txt_ids"].expand(2, -1, -1),
                 x["timesteps"], x["y"]).square().mean()
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for name, p in model.named_parameters() if ".lora." not in name)
    assert all(p.abs().sum() > 0 for p in parameters[1::2]), "every B must have moved"
    assert all(torch.equal(a, a0) for a, a0 in zip(parameters[0::2], A0)), "with B = 0, A gets no gradient on step one"
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


# --------------------------------------------------------------------------------------------------
# The other layouts, written by hand from their descriptions, against hand-merged weights
# --------------------------------------------------------------------------------------------------

# (key stem, down suffix, up suffix, alpha or None) -> (our module, first row, rows, swap halves), each
# placement written from the format's description, not from flux/weights/lora.py:
# - XLabs (x-flux, src/flux/modules/layers.py, as we read it): DoubleStreamBlockLoraProcessor adds
#   qkv_lora1(x) to img_attn.qkv's output and proj_lora1 to img_attn.proj's, lora2 the same for the text
#   stream; SingleStreamBlockLoraProcessor adds qkv_lora to the q, k, v part of linear1 (not the MLP part)
#   and proj_lora to linear2. LoRALinearLayer is up(down(x)), unscaled when no network_alpha is given.
# - OneTrainer (as ComfyUI's comfy/lora.py maps it): `lora_transformer_` + the diffusers module path with
#   dots as underscores; kohya's lora_down/lora_up/alpha. diffusers' to_k is rows C:2C of our qkv, proj_mlp
#   rows 3C: of linear1, norm_out.linear our final modulation with (scale, shift) halves swapped.
# - kohya sd-scripts: `lora_unet_` + the official module name with dots as underscores.
# - ComfyUI / Black Forest Labs: official names under `diffusion_model.`; lora_A/B or lora_down/up.
XLABS, KOHYA, PEFT = (".down.weight", ".up.weight"), (".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight")
HAND_BUILT = {  # scheme -> [(key stem, suffixes, alpha or None, our module, first row, rows, swapped halves)]
    "xlabs": [
        ("double_blocks.0.processor.qkv_lora1", XLABS, None, "double_blocks.0.img_attn.qkv", 0, 3 * C, False),
        ("diffusion_model.double_blocks.1.processor.proj_lora2", XLABS, None, "double_blocks.1.txt_attn.proj", 0, C, False),
        ("double_blocks.1.processor.qkv_lora2", XLABS, None, "double_blocks.1.txt_attn.qkv", 0, 3 * C, False),
        ("single_blocks.1.processor.qkv_lora", XLABS, None, "single_blocks.1.linear1", 0, 3 * C, False),
        ("single_blocks.2.processor.proj_lora", XLABS, None, "single_blocks.2.linear2", 0, C, False),
    ],
    "onetrainer": [
        ("lora_transformer_transformer_blocks_0_attn_to_k", KOHYA, 6.0, "double_blocks.0.img_attn.qkv", C, C, False),
        ("lora_transformer_transformer_blocks_1_attn_add_v_proj", KOHYA, 2.0, "double_blocks.1.txt_attn.qkv", 2 * C, C, False),
        ("lora_transformer_single_transformer_blocks_1_proj_mlp", KOHYA, 1.0, "single_blocks.1.linear1", 3 * C, M, False),
        ("lora_transformer_norm_out_linear", KOHYA, 3.0, "final_layer.adaLN_modulation.1", 0, 2 * C, True),
        ("lora_transformer_context_embedder", KOHYA, None, "txt_in", 0, C, False),
    ],
    "kohya and comfyui": [
        ("lora_unet_single_blocks_0_linear1", KOHYA, 5.0, "single_blocks.0.linear1", 0, 3 * C + M, False),
        ("lora_unet_double_blocks_1_img_mlp_2", KOHYA, None, "double_blocks.1.img_mlp.2", 0, C, False),
        ("diffusion_model.double_blocks.0.txt_mod.lin", KOHYA, 8.0, "double_blocks.0.txt_mod.lin", 0, 6 * C, False),
        ("diffusion_model.final_layer.adaLN_modulation.1", PEFT, None, "final_layer.adaLN_modulation.1", 0, 2 * C, False),
        ("time_in.in_layer", PEFT, 2.0, "time_in.in_layer", 0, C, False),
    ],
}


@pytest.mark.parametrize("scheme", HAND_BUILT)
def test_hand_built_layouts_match_merged_weights(base, scheme, tmp_path):
    generator = torch.Generator().manual_seed(1)
    merged = ours(base)
    tensors = {}
    for stem, (down, up), alpha, module, first, rows, swap in HAND_BUILT[scheme]:
        rank, in_features = 3, merged.get_submodule(module).in_features
        A = torch.randn(rank, in_features, generator=generator) * 0.05
        B = torch.randn(rows, rank, generator=generator) * 0.05
        tensors |= {stem + down: A, stem + up: B} | ({stem + ".alpha": torch.tensor(alpha)} if alpha is not None else {})
        if swap:  # the file's rows are (scale, shift); ours (shift, scale)
            B = torch.cat([B[rows // 2:], B[:rows // 2]])
        with torch.no_grad():  # no alpha: alpha = rank, a scale of 1
            merged.get_submodule(module).weight[first:first + rows] += (alpha or rank) / rank * B @ A
    save_file(tensors, tmp_path / "lora.safetensors")
    model = ours(base)
    load_lora(model, tmp_path / "lora.safetensors")
    x = inputs()
    error = relative_error(run_ours(model, x), run_ours(merged, x))
    assert error <= 1e-5, f"fp32 max relative error {error:.2e}"
    assert relative_error(run_ours(ours(base), x), run_ours(merged, x)) > 1e-3, "the LoRA hardly changes the output"


# --------------------------------------------------------------------------------------------------
# Errors: each names the key, and the model is left untouched
# --------------------------------------------------------------------------------------------------

def pair(stem, rank=2, in_features=C, out_features=C):
    down, up = ("lora_down", "lora_up") if stem.startswith("lora_") else ("lora_A", "lora_B")
    return {f"{stem}.{down}.weight": torch.randn(rank, in_features), f"{stem}.{up}.weight": torch.randn(out_features, rank)}


TEXT_ENCODER_KEY = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"


@pytest.mark.parametrize("tensors, message", [
    pytest.param({**pair("transformer.transformer_blocks.0.attn.to_q"), **pair("lora_unet_down_blocks_0_attentions_0_proj_in")},
                 r"2 key\(s\).*'lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight'", id="SDXL key"),
    pytest.param(pair("transformer.transformer_blocks.7.attn.to_q"),
                 r"'transformer.transformer_blocks.7.attn.to_q.lora_A.weight'", id="no block 7"),
    pytest.param(pair("guidance_in.in_layer", in_features=256), r"'guidance_in.in_layer.lora_A.weight'", id="dev LoRA on schnell"),
    pytest.param({"img_in.weight": torch.randn(C, 64)}, r"'img_in.weight'", id="a full weight"),
    pytest.param({**pair("lora_unet_img_in", in_features=64), TEXT_ENCODER_KEY: torch.randn(2, 768)},
                 rf"'{TEXT_ENCODER_KEY}' belongs to a text-encoder LoRA.*not supported", id="kohya text encoder"),
    pytest.param({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 768)},
                 r"text-encoder LoRAs are not supported", id="diffusers text encoder"),
    pytest.param({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, C)},
                 r"'transformer.transformer_blocks.0.attn.to_q.lora_A.weight' has no partner", id="A without B"),
    pytest.param(pair("transformer.transformer_blocks.0.attn.to_v", out_features=C + 1),
                 r"'transformer.transformer_blocks.0.attn.to_v.lora_B.weight' has shape \(385, 2\), but "
                 r"double_blocks.0.img_attn.qkv \(nn.Linear 384 -> 1152, rows 768:1152\) with rank 2 .* needs \(384, 2\)",
                 id="B shape"),
    pytest.param(pair("lora_unet_single_blocks_0_linear2", in_features=C),
                 r"'lora_unet_single_blocks_0_linear2.lora_down.weight' has shape \(2, 384\), but "
                 r"single_blocks.0.linear2 \(nn.Linear 1920 -> 384\) needs \(rank, 1920\)", id="A shape"),
])
def test_bad_files_are_refused_by_name(base, tensors, message, tmp_path):
    save_file(tensors, tmp_path / "bad.safetensors")
    model = ours(base)
    with pytest.raises(CheckpointError, match=message):
        load_lora(model, tmp_path / "bad.safetensors")
    assert not any(".lora." in name for name in model.state_dict()), "a refused file must leave the model untouched"


def test_missing_file_and_unknown_target(base, tmp_path):
    model = ours(base)
    with pytest.raises(CheckpointError, match=r"nowhere.safetensors: file not found"):
        load_lora(model, tmp_path / "nowhere.safetensors")
    with pytest.raises(ValueError, match=r"'double_blocks.\*.img_attn.to_q' matches no nn.Linear"):
        add_lora(model, rank=4, targets=("double_blocks.*.img_attn.to_q",))
