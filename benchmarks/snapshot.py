"""A synthetic FLUX.1 repository at the real widths and reduced depth, laid out as the official one.

    python -m benchmarks.snapshot OUT_FOLDER [--double 2 --single 4 --t5-layers 2]

Speed and memory do not depend on the weights' values, so every component is made with random weights by
the reference libraries (diffusers, transformers, sentencepiece), at the official widths — transformer
hidden size 3072 with 24 heads of 128, T5 width 4096 (64 heads of 64, feed-forward 10240), CLIP ViT-L/14's
text tower (768 wide, 12 layers) and the official autoencoder (83.8 M parameters) — with fewer transformer
blocks and T5 layers so that a run fits a small machine. Only the vocabularies are small (a few dozen
words), which changes nothing but the size of two embedding tables.

The folder holds both layouts, as the official repository does: diffusers' `model_index.json`,
`scheduler/`, `text_encoder*/`, `tokenizer*/`, `transformer/` and `vae/` (what diffusers' `FluxPipeline`
reads), and Black Forest Labs' `flux1-schnell.safetensors` and `ae.safetensors` (what our loader prefers).
Storage dtypes follow the official files: transformer and T5 in bf16, CLIP in fp16, autoencoder in fp32.
"""

import argparse
import io
import json
import random
import time
from pathlib import Path

import torch

WORDS = ("a red green blue yellow small large circle square triangle at the top bottom left right centre of "
         "background photo cat dog on in with and painting sky over under").split()
PROMPT = "a photo of a small red cat on the left of a large blue square, painting of the sky in the background"


def build(root: Path, *, double: int = 2, single: int = 4, t5_layers: int = 2, seed: int = 0) -> Path:
    """Writes the repository into `root` (created) and returns it; skips the work if it is already there."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    from flux.weights.loading import load_autoencoder, load_flow_model

    recipe = {"double": double, "single": single, "t5_layers": t5_layers, "seed": seed}
    stamp = root / "benchmark_snapshot.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return root
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    clip_tokenizer_files(root / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", model_max_length=77, pad_token="<|endoftext|>")
    t5_spiece_model(root / "tokenizer_2")
    tokenizer_2 = T5TokenizerFast.from_pretrained(root / "tokenizer_2", extra_ids=100, model_max_length=512)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(  # openai/clip-vit-large-patch14's text tower
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    text_encoder_2 = T5EncoderModel(T5Config(  # google/t5-v1_1-xxl's widths
        vocab_size=len(tokenizer_2), d_model=4096, d_kv=64, d_ff=10240, num_layers=t5_layers, num_heads=64,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, is_encoder_decoder=False))
    vae = AutoencoderKL(  # FLUX.1's vae/config.json
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
        act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
    transformer = FluxTransformer2DModel(  # FLUX.1-schnell's transformer/config.json but for the depths
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
        axes_dims_rope=(16, 56, 56))
    with torch.no_grad():  # no zero-initialised layer: every path computes, and activations stay moderate
        for module in (text_encoder, text_encoder_2, vae, transformer):
            for p in module.parameters():
                if p.ndim > 1:
                    p.normal_(0, 0.5 / p.shape[1] ** 0.5 if p.ndim == 2 else 0.02)
                else:
                    p.normal_(1.0 if p.abs().mean() > 0.5 else 0.0, 0.02)  # norms near 1, biases near 0
    transformer.to(torch.bfloat16)
    text_encoder_2.to(torch.bfloat16)
    text_encoder.to(torch.float16)
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-schnell's scheduler/scheduler_config.json
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_image_seq_len=256,
        max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(root, max_shard_size="100GB")
    del pipe, transformer, text_encoder, text_encoder_2, vae

    # Black Forest Labs' single files, converted from the diffusers folders by our loader (tested against the
    # official key manifests in tests/): what `Pipeline.from_pretrained` reads from a full snapshot.
    model = load_flow_model(root / "transformer", dtype=torch.bfloat16)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "flux1-schnell.safetensors")
    del model
    ae = load_autoencoder(root / "vae", dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, root / "ae.safetensors")
    stamp.write_text(json.dumps(recipe))
    print(f"built {root} in {time.perf_counter() - start:.0f} s", flush=True)
    return root


def clip_tokenizer_files(folder: Path) -> None:
    """A small CLIP BPE vocabulary in the official file format (vocab.json + merges.txt): GPT-2's byte
    alphabet, with and without the end-of-word mark, plus one merge chain per word of WORDS."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]
    vocab, merges = alphabet + [c + "</w>" for c in alphabet], []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            if f"{pieces[0]} {pieces[1]}" not in merges:
                merges.append(f"{pieces[0]} {pieces[1]}")
                vocab.append(pieces[0] + pieces[1])
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(dict.fromkeys(vocab))}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def t5_spiece_model(folder: Path) -> None:
    """A small sentencepiece unigram model with T5's conventions (pad 0, eos 1, unk 2, no bos)."""
    import sentencepiece as spm

    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=50,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram",
                                   character_coverage=1.0, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--t5-layers", type=int, default=2)
    args = parser.parse_args()
    build(args.out, double=args.double, single=args.single, t5_layers=args.t5_layers)


if __name__ == "__main__":
    main()
