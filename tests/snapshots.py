"""A tiny but complete FLUX.1 repository snapshot, built from independent references (fixtures in conftest.py).

Every component is made by the reference libraries (diffusers, transformers, sentencepiece) with random
weights at small sizes, and saved as the official repository lays it out (manifests/README.md): diffusers'
`FluxPipeline.save_pretrained` writes `model_index.json`, `scheduler/`, `text_encoder*/`, `tokenizer*/`,
`transformer/` and `vae/`; the top-level `flux1-*.safetensors` and `ae.safetensors` in Black Forest Labs'
layout are added next to them.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

MANIFESTS = next((p / "shared" / "manifests" for p in Path(__file__).resolve().parents if (p / "shared" / "manifests").is_dir()), None)

WORDS = ("a red green blue yellow small large circle square triangle at the top bottom left right centre of "
         "background photo cat dog on in with and painting sky over under").split()


def clip_tokenizer_files(folder: Path) -> None:
    """A small CLIP BPE vocabulary in the official file format (vocab.json + merges.txt)."""
    # GPT-2's byte alphabet: printable bytes stand for themselves, the others for code points from 256 on.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges = []
    for word in WORDS:  # merge each word left to right, the last piece carrying the end-of-word mark
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if f"{pieces[0]} {pieces[1]}" not in merges:
                merges.append(f"{pieces[0]} {pieces[1]}")
                vocab.append(merged)
            pieces = [merged] + pieces[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(dict.fromkeys(vocab))}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def t5_spiece_model(folder: Path) -> None:
    """A small sentencepiece unigram model with T5's conventions (pad 0, eos 1, unk 2, no bos)."""
    import io
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=50,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram",
                                   character_coverage=1.0, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())


def build_tiny_snapshot(root: Path, *, dev: bool, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    from flux.modules.configs import TINY

    params = replace(TINY, guidance_embed=dev)
    # The official tokenizer folders hold vocab.json + merges.txt and spiece.model; transformers 5 saves
    # only tokenizer.json, so the source files are written first and kept beside what it saves.
    clip_tokenizer_files(root / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", model_max_length=77, pad_token="<|endoftext|>")
    t5_spiece_model(root / "tokenizer_2")
    tokenizer_2 = T5TokenizerFast.from_pretrained(root / "tokenizer_2", extra_ids=100)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=params.vec_in_dim, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=params.context_in_dim, d_kv=32, d_ff=80, num_layers=2, num_heads=3,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, is_encoder_decoder=False))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 32, 64, 64], layers_per_block=2,
                        latent_channels=16, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=False, use_post_quant_conv=False)
    transformer = random_transformer(dev=dev, randomize=False)  # below, after the others, as it always was
    with torch.no_grad():  # random everywhere: no zero-initialised layer may hide a path
        for module in (text_encoder, text_encoder_2, vae, transformer):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0 if dev else 1.0, use_dynamic_shifting=dev, base_image_seq_len=256,
        max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(root)
    return root


def random_transformer(*, dev: bool, in_channels: int = 64, randomize: bool = True):
    """diffusers' FluxTransformer2DModel at the TINY size, random everywhere; `in_channels` 384 is a Fill
    model, 128 a Canny/Depth one (their outputs stay 64 channels)."""
    from diffusers import FluxTransformer2DModel

    from flux.modules.configs import TINY

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, out_channels=64, num_layers=TINY.depth,
        num_single_layers=TINY.depth_single_blocks, attention_head_dim=128, num_attention_heads=TINY.num_heads,
        joint_attention_dim=TINY.context_in_dim, pooled_projection_dim=TINY.vec_in_dim, guidance_embeds=dev,
        axes_dims_rope=TINY.axes_dim)
    with torch.no_grad():
        for p in transformer.parameters() if randomize else ():
            p.add_(torch.randn_like(p) * 0.02)
    return transformer


def build_family_snapshot(dev_root: Path, root: Path, *, in_channels: int, pipeline: str, name: str, seed: int) -> Path:
    """A FLUX.1 family member's repository (manifests/README.md, "The FLUX.1 family"): the dev snapshot's text
    encoders, autoencoder and scheduler, a new random transformer taking `in_channels`, model_index.json naming
    `pipeline` (FluxFillPipeline, FluxControlPipeline, FluxKontextPipeline) and the single file `name`.safetensors."""
    import shutil

    from safetensors.torch import save_file

    from flux import load_flow_model

    shutil.copytree(dev_root, root, ignore=shutil.ignore_patterns("transformer", "flux1-*.safetensors"), dirs_exist_ok=True)
    torch.manual_seed(seed)
    random_transformer(dev=True, in_channels=in_channels).save_pretrained(root / "transformer")
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline}, indent=2))
    model = load_flow_model(root / "transformer", dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / f"{name}.safetensors")
    return root


def bfl_control_lora(model, path, *, rank=4, seed=0):
    """A LoRA in the layout of Black Forest Labs' flux1-canny-dev-lora.safetensors (manifests/README.md): for every
    Linear of the transformer `name.lora_A.weight` (rank, in), `name.lora_B.weight` (out, rank) and
    `name.lora_B.bias` (out,), img_in's A taking 128 inputs; and a full `...query_norm.scale` / `...key_norm.scale`
    for every attention. Random, with updates large enough to change the output."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            in_features = 128 if name == "img_in" else module.in_features
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.1
            tensors[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.1
            tensors[f"{name}.lora_B.bias"] = torch.randn(module.out_features, generator=generator) * 0.02
    for name, parameter in model.named_parameters():
        if name.endswith(("query_norm.scale", "key_norm.scale")):
            tensors[name] = 1 + 0.2 * torch.randn(parameter.shape, generator=generator)
    save_file(tensors, str(path))
    return tensors


def add_official_single_files(root: Path, *, dev: bool) -> None:
    """Black Forest Labs' layout next to diffusers': our loaders' names are the official ones (test_model.py
    and test_autoencoder.py prove it against the manifests)."""
    from safetensors.torch import save_file

    from flux import load_autoencoder, load_flow_model

    model = load_flow_model(root / "transformer", dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / f"flux1-{'dev' if dev else 'schnell'}.safetensors")
    ae = load_autoencoder(root / "vae", dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, root / "ae.safetensors")


@pytest.fixture(scope="session")
def tiny_snapshot(tmp_path_factory):
    """A schnell-style snapshot with both transformer and autoencoder layouts."""
    root = build_tiny_snapshot(tmp_path_factory.mktemp("FLUX.1-tiny-schnell"), dev=False)
    add_official_single_files(root, dev=False)
    return root


@pytest.fixture(scope="session")
def tiny_dev_snapshot(tmp_path_factory):
    root = build_tiny_snapshot(tmp_path_factory.mktemp("FLUX.1-tiny-dev"), dev=True)
    add_official_single_files(root, dev=True)
    return root


def build_tiny_redux(root: Path, *, seed: int = 0):
    """A tiny FLUX.1-Redux-dev snapshot for the tiny transformer (text width 48), saved by diffusers'
    `FluxPriorReduxPipeline.save_pretrained` (`image_encoder/`, `feature_extractor/`, `image_embedder/`,
    model_index.json), with Black Forest Labs' `flux1-redux-dev.safetensors` (the embedder's tensors) beside them.
    Returns the root and the reference pipeline."""
    from diffusers import FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from safetensors.torch import save_file
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    from flux.modules.configs import TINY
    from flux.modules.siglip import TINY as SIGLIP

    torch.manual_seed(seed)
    encoder = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=SIGLIP.hidden_size, intermediate_size=SIGLIP.intermediate_size,
        num_hidden_layers=SIGLIP.num_hidden_layers, num_attention_heads=SIGLIP.num_attention_heads,
        image_size=SIGLIP.image_size, patch_size=SIGLIP.patch_size, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6)).eval()
    embedder = ReduxImageEncoder(redux_dim=SIGLIP.hidden_size, txt_in_features=TINY.context_in_dim).eval()
    with torch.no_grad():  # random everywhere: no zero-initialised layer may hide a path
        for module in (encoder, embedder):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    # The official preprocessor_config.json at the tiny size. transformers 4's (Pillow) SiglipImageProcessor, which
    # the official pipelines ran, is SiglipImageProcessorPil in transformers 5.
    processor = SiglipImageProcessorPil(size={"height": SIGLIP.image_size, "width": SIGLIP.image_size}, resample=3,
                                        do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                        image_mean=[0.5] * 3, image_std=[0.5] * 3)
    pipe = FluxPriorReduxPipeline(image_encoder=encoder, feature_extractor=processor, image_embedder=embedder)
    pipe.save_pretrained(root)
    save_file({k: v.contiguous() for k, v in embedder.state_dict().items()}, root / "flux1-redux-dev.safetensors")
    return root, pipe


@pytest.fixture(scope="session")
def tiny_redux(tmp_path_factory):
    """(root, reference FluxPriorReduxPipeline without text encoders)."""
    return build_tiny_redux(tmp_path_factory.mktemp("FLUX.1-Redux-tiny"))


@pytest.fixture(scope="session")
def tiny_fill_snapshot(tiny_dev_snapshot, tmp_path_factory):
    return build_family_snapshot(tiny_dev_snapshot, tmp_path_factory.mktemp("FLUX.1-tiny-Fill-dev"), in_channels=384,
                                 pipeline="FluxFillPipeline", name="flux1-fill-dev", seed=1)


@pytest.fixture(scope="session")
def tiny_canny_snapshot(tiny_dev_snapshot, tmp_path_factory):
    return build_family_snapshot(tiny_dev_snapshot, tmp_path_factory.mktemp("FLUX.1-tiny-Canny-dev"), in_channels=128,
                                 pipeline="FluxControlPipeline", name="flux1-canny-dev", seed=2)


@pytest.fixture(scope="session")
def tiny_kontext_snapshot(tiny_dev_snapshot, tmp_path_factory):
    return build_family_snapshot(tiny_dev_snapshot, tmp_path_factory.mktemp("FLUX.1-tiny-Kontext-dev"), in_channels=64,
                                 pipeline="FluxKontextPipeline", name="flux1-kontext-dev", seed=3)
