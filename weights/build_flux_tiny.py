"""Builds weights/flux-tiny, the small built-in FLUX model, from nothing: `python weights/build_flux_tiny.py`.

Every part is made here, with the library's own modules and training code, from the procedural data set of
captioned shapes (`flux.training.shapes`) and its captions in many phrasings (`flux.training.captions`):

  1. tokenizers    T5's sentencepiece model and CLIP's BPE files, open-vocabulary: trained on an English word
                   list (Debian's wamerican, build time only) and the captions;
  2. text          small T5 and CLIP text encoders, pre-trained to read the scene from the captions, then
                   frozen (FLUX's encoders are frozen too: the transformer learns to read what they produce);
  3. ae            a small autoencoder with the official structure and 16 latent channels, built so that
                   its latents are the pictures' colours at 1/16 size (see the note before `build_autoencoder`);
  4. cache         the training set's latents and the encodings of several captions per picture, computed once;
  5. flow          the FLUX transformer (head dim 128, rotary axes (16, 56, 56), schnell-style: no guidance
                   embedding), trained with `flux.training.rectified_flow_loss`, from scratch or (`--init`)
                   from an earlier transformer file;
  6. decoder       the autoencoder's decoder, trained to sharpen its blocky start (independent of 4-5: it
                   may run beside them, `--stage decoder`);
  7. export        the transformer's averaged (EMA) weights and the files that describe the repository.

The held-out prompts (`flux.training.heldout_captions`) are never trained on; weights/evaluate_flux_tiny.py
measures the built model on them.

The output is laid out like the official repository (weights/README.md) and loads with
`flux.Pipeline.from_pretrained`. Stages can be run one at a time (`--stage ae`); each skips work whose output
already exists, and the flow stage resumes from its last checkpoint in `--work`. Everything is seeded.
"""

import argparse
import io
import json
import logging
import math
import random
import struct
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flux.training import captions, heldout_captions, shapes
from flux.modules.autoencoder import AutoEncoder, AutoEncoderParams
from flux.modules.clip import CLIPTextConfig, CLIPTextModel
from flux.modules.configs import FLUX_SCHNELL, SamplingDefaults
from flux.weights.loading import load_autoencoder, load_clip, load_t5
from flux.modules.transformer import Flux
from flux.modules.t5 import T5Config, T5Encoder
from flux.training.data import encode_captions, encode_images
from flux.training.objective import rectified_flow_loss, sample_timesteps

HERE = Path(__file__).resolve().parent
STAGES = ("tokenizers", "text", "ae", "cache", "flow", "decoder", "export")

IMAGE_SIZE = 64  # pixels; 8×8 latents, 16 image tokens
MAX_SEQUENCE_LENGTH = 32  # T5 tokens: the training captions' 99th percentile (the build prints it)
T5_VOCAB, CLIP_VOCAB = 8000, 8000  # sentencepiece pieces, BPE tokens: sub-words of the English word list
# Small encoders: pre-training them must fit this machine's budget beside the transformer's.
T5_CONFIG = dict(d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2, relative_attention_num_buckets=32,
                 relative_attention_max_distance=128, layer_norm_epsilon=1e-6)
CLIP_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   max_position_embeddings=77, layer_norm_eps=1e-5)
TEXT_BATCH = 64  # captions per step of the text encoders' pre-training
# Four levels (8× downsampling) and 16 latent channels as in FLUX, one ResNet block per level instead of two,
# and widths (64, 32, 32, 64) instead of (128, 256, 512, 512). The two ends are the widest because GroupNorm(32)
# over 32 channels is an instance norm: it erases each channel's mean over the picture, which for a flat
# background is its colour. The norms right before the latents (encoder, last level) and before the output
# pixels (decoder, first level) need at least two channels per group to pass colours on.
AE_PARAMS = AutoEncoderParams(resolution=IMAGE_SIZE, ch=32, ch_mult=(2, 1, 1, 2), num_res_blocks=1)
# FLUX's architecture with one head of the real head dim (128) and rotary axes (16, 56, 56), one double- and
# two single-stream blocks; schnell-style, without a guidance embedding.
FLOW_PARAMS = replace(FLUX_SCHNELL, vec_in_dim=CLIP_CONFIG["hidden_size"], context_in_dim=T5_CONFIG["d_model"],
                      hidden_size=128, num_heads=1, depth=1, depth_single_blocks=2, guidance_embed=False)
SAMPLING = SamplingDefaults(num_steps=8, guidance=None, shift_schedule=False,
                            max_sequence_length=MAX_SEQUENCE_LENGTH, image_size=IMAGE_SIZE)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    parser.add_argument("--out", type=Path, default=HERE / "flux-tiny")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "flux-tiny-build",
                        help="caches and training checkpoints (not shipped)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ae-steps", type=int, default=240)
    parser.add_argument("--text-steps", type=int, default=4000)
    parser.add_argument("--flow-steps", type=int, default=20000)
    parser.add_argument("--init", type=Path, default=None,
                        help="a transformer file to start the flow stage from (see start_from); default: from scratch")
    parser.add_argument("--decoder-steps", type=int, default=200)
    parser.add_argument("--train-images", type=int, default=8000)
    parser.add_argument("--captions-per-image", type=int, default=8)
    parser.add_argument("--force", action="store_true", help="redo the chosen stage(s) even if their output exists")
    args = parser.parse_args(argv)
    # The few captions longer than T5's 32 tokens are cut, as the pipeline cuts prompts; the tokenizer's
    # warning for each would flood the log.
    logging.getLogger("flux.weights.tokenizers").setLevel(logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter()
    for stage in STAGES if args.stage == "all" else (args.stage,):
        start = time.perf_counter()
        print(f"== {stage}", flush=True)
        globals()[f"stage_{stage}"](args)
        print(f"== {stage}: {time.perf_counter() - start:.0f} s", flush=True)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"== done in {time.perf_counter() - total:.0f} s; {args.out} holds {size / 2**20:.1f} MiB", flush=True)
    return 0


def seeded(seed: int, stage: str) -> int:
    """A separate, fixed seed per stage, so one stage can be rerun alone and still give the same result."""
    torch.manual_seed(seed * 1000 + STAGES.index(stage))
    return seed * 1000 + STAGES.index(stage)


# ---- 1. tokenizers -----------------------------------------------------------------------------------
# Both tokenizers have an open vocabulary: trained on a broad English word list and the training captions,
# so that a word the captions never use still falls into known pieces (sub-words), not into <unk> or bytes.
# The caption words themselves are whole pieces. The word list is read at build time only, not shipped.
WORD_LIST = Path("/usr/share/dict/american-english")  # Debian's wamerican: 100 000 words


def english_words() -> list[str]:
    """The word list's plain lower-case words (no possessives, names or accents), in its order."""
    if not WORD_LIST.is_file():
        raise SystemExit(f"{WORD_LIST} is missing: the tokenizers are trained on it (apt-get install wamerican)")
    words = WORD_LIST.read_text(encoding="utf-8").split()
    return list(dict.fromkeys(w for w in words if w.isascii() and w.isalpha() and w.islower()))


def noise_words() -> list[str]:
    """The English words scattered through the training captions as noise: none that names a colour, shape,
    size or position of the data set, and none the held-out evaluation uses (so that it stays unseen)."""
    kept_out = set(captions.vocabulary()) | set(heldout_captions.vocabulary()) | set(shapes.vocabulary())
    return [w for w in english_words() if 2 < len(w) < 8 and w not in kept_out]


def training_captions(count: int, seed: int) -> list[tuple[shapes.Scene, str]]:
    """`count` random scenes, each with one caption drawn by `captions.describe` (with noise words)."""
    rng, noise = random.Random(seed), noise_words()
    pairs = []
    for _ in range(count):
        scene = shapes.random_scene(rng)
        pairs.append((scene, captions.describe(scene, rng, noise_words=noise)))
    return pairs


def stage_tokenizers(args) -> None:
    """T5's `spiece.model` (+ `tokenizer.json`) and CLIP's `vocab.json` + `merges.txt`, open-vocabulary."""
    if (args.out / "tokenizer_2" / "spiece.model").is_file() and not args.force:
        print("exists, skipped")
        return
    import sentencepiece as spm

    from flux.weights.tokenizers import T5Tokenizer

    corpus = [caption for _, caption in training_captions(30_000, seeded(args.seed, "tokenizers"))] + english_words()
    caption_words = list(dict.fromkeys(captions.vocabulary() + shapes.vocabulary()))
    folder = args.out / "tokenizer_2"
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.set_random_generator_seed(args.seed)
    # T5's conventions: <pad> 0, </s> 1, <unk> 2, no <s>. nmt_nfkc_cf is T5's normalisation (nmt_nfkc) with
    # case folding: "RED" and "Red" are "red", as CLIP's tokenizer lower-cases too.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=T5_VOCAB, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, normalization_rule_name="nmt_nfkc_cf",
        num_threads=1, minloglevel=2, input_sentence_size=0, shuffle_input_sentence=False)
    (folder / "spiece.model").write_bytes(with_whole_words(model.getvalue(), caption_words))
    write_json(folder / "tokenizer_config.json", dict(
        tokenizer_class="T5Tokenizer", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=100,
        model_max_length=MAX_SEQUENCE_LENGTH))
    write_json(folder / "special_tokens_map.json", dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>"))
    # tokenizer.json, the `tokenizers` library's file for the same vocabulary (the official folder has both).
    T5Tokenizer.from_folder(folder).backend.save(str(folder / "tokenizer.json"))

    folder = args.out / "tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe(corpus, caption_words)
    write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                   unk_token="<|endoftext|>")
    write_json(folder / "tokenizer_config.json", dict(tokenizer_class="CLIPTokenizer", model_max_length=77,
                                                      do_lower_case=True, **special))
    write_json(folder / "special_tokens_map.json", special)
    t5 = T5Tokenizer.from_folder(args.out / "tokenizer_2").backend
    for word in caption_words:  # one token each, or the encoders would see pieces of words
        assert len(t5.encode(word).ids) == 1, word
    lengths = sorted(len(t5.encode(caption).ids) + 1 for caption in corpus[:30_000])
    print(f"T5 {t5.get_vocab_size()} pieces, CLIP {len(vocab)} tokens; captions' T5 length: median "
          f"{lengths[len(lengths) // 2]}, 99th percentile {lengths[int(0.99 * len(lengths))]}, max {lengths[-1]}")


def with_whole_words(model: bytes, words: list[str]) -> bytes:
    """A sentencepiece model with a piece for each of `words` (as "▁word") that it lacks.

    Each piece gets the best score any piece has, so the Viterbi split always prefers the whole word to
    two or more pieces. `ModelProto.pieces` is field 1, repeated: pieces appended at the end of the message
    join the list (protobuf concatenates repeated fields), after the trained ones.
    """
    from flux.weights.tokenizers import _read_sentencepiece_model

    with tempfile.NamedTemporaryFile(suffix=".model") as file:
        file.write(model)
        file.flush()
        pieces, _ = _read_sentencepiece_model(Path(file.name))
    known = {piece for piece, _, _ in pieces}
    best = max(score for _, score, kind in pieces if kind == 1)  # sentencepiece's NORMAL pieces
    for word in words:
        if "\u2581" + word in known:
            continue
        text = ("\u2581" + word).encode("utf-8")
        entry = b"\x0a" + varint(len(text)) + text + b"\x15" + struct.pack("<f", best)  # {1: piece, 2: score}
        model += b"\x0a" + varint(len(entry)) + entry
    return model


def varint(value: int) -> bytes:
    """Protobuf's base-128 integer: seven bits per byte, least significant first, high bit = more follow."""
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def clip_bpe(corpus: list[str], words: list[str]) -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocabulary in CLIP's format, its merges learnt from `corpus` by the `tokenizers`
    library's trainer on the same normalisation and pre-tokenisation as CLIP's; every one of `words` one token."""
    from tokenizers import Tokenizer, models, trainers

    from flux.weights.tokenizers import CLIPTokenizer

    # The pipeline CLIPTokenizer runs (NFC, whitespace, lower case; CLIP's pieces, bytes as GPT-2's
    # printable stand-ins), on an empty model to be trained.
    reference = CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[], pad_token="<|endoftext|>",
                              added_tokens=[]).backend
    trainee = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    trainee.normalizer, trainee.pre_tokenizer = reference.normalizer, reference.pre_tokenizer
    alphabet = byte_alphabet()
    trainer = trainers.BpeTrainer(vocab_size=CLIP_VOCAB, initial_alphabet=alphabet, end_of_word_suffix="</w>",
                                  show_progress=False, min_frequency=2)
    trainee.train_from_iterator(corpus + words * 50, trainer)  # the caption words often enough to merge whole
    merges = [" ".join(merge) if not isinstance(merge, str) else merge
              for merge in json.loads(trainee.to_str())["model"]["merges"]]
    # CLIP's order: the 256 byte symbols, the same with "</w>", the merged tokens, then the two specials.
    tokens = alphabet + [c + "</w>" for c in alphabet] + [merge.replace(" ", "") for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]  # last, as in CLIP: the end of text has the largest id
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}, merges


def byte_alphabet() -> list[str]:
    """GPT-2's (and CLIP's) stand-ins for the 256 bytes: printable bytes stand for themselves, the others
    for code points from 256 on (GPT-2's bytes_to_unicode), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


# ---- 2. text encoders ------------------------------------------------------------------------------------
# FLUX's text encoders are frozen while the transformer trains, and what makes FLUX.1 read plain English is
# that T5 and CLIP were pre-trained on a lot of it. Ours are pre-trained on the captions instead, for the one
# thing the transformer needs from them: the scene. Small classifier heads read the five attributes (shape,
# colour, background, position, size) from CLIP's pooled vector, from the mean of T5's states and from
# every one of T5's states (so that attention can find the scene wherever it looks, padding included: the
# pipeline runs T5 unmasked); the encoders learn to make them readable, whatever the phrasing. The heads are
# then dropped and the encoders frozen.
ATTRIBUTES = (("shape", shapes.SHAPES), ("colour", tuple(shapes.COLOURS)), ("background", tuple(shapes.COLOURS)),
              ("position", tuple(shapes.POSITIONS)), ("size", tuple(shapes.SIZES)))


def scene_labels(scenes: list[shapes.Scene]) -> torch.Tensor:
    """B scenes -> (B, 5) int64 class indices, one column per attribute of ATTRIBUTES."""
    return torch.tensor([[values.index(getattr(scene, name)) for name, values in ATTRIBUTES] for scene in scenes])


class SceneHeads(torch.nn.Module):
    """(..., C) features -> a list of five (..., classes) logits, one per attribute."""

    def __init__(self, width: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, len(values)) for _, values in ATTRIBUTES)

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        return [head(features) for head in self.heads]


def scene_loss(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the attributes; logits (B, classes) or (B, L, classes), labels (B, 5)."""
    total = 0.0
    for k, attribute in enumerate(logits):
        target = labels[:, k] if attribute.ndim == 2 else labels[:, k, None].expand(attribute.shape[:2])
        total = total + F.cross_entropy(attribute.flatten(0, -2), target.flatten())
    return total


def text_encoders(out: Path) -> tuple[T5Encoder, CLIPTextModel, dict, dict]:
    """Fresh T5 and CLIP encoders sized for the tokenizers in `out`, with their Hugging Face configs."""
    t5_vocab = len(json.loads((out / "tokenizer_2" / "tokenizer.json").read_text())["model"]["vocab"])
    clip_vocab = json.loads((out / "tokenizer" / "vocab.json").read_text())
    eos = clip_vocab["<|endoftext|>"]
    t5 = T5Encoder(T5Config(vocab_size=t5_vocab, **T5_CONFIG))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_vocab), eos_token_id=eos, **CLIP_CONFIG))
    t5_config = dict(architectures=["T5EncoderModel"], model_type="t5", vocab_size=t5_vocab,
                     feed_forward_proj="gated-gelu", is_gated_act=True, dense_act_fn="gelu_new", dropout_rate=0.0,
                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **T5_CONFIG)
    clip_config = dict(architectures=["CLIPTextModel"], model_type="clip_text_model", vocab_size=len(clip_vocab),
                       hidden_act="quick_gelu", projection_dim=CLIP_CONFIG["hidden_size"],
                       bos_token_id=clip_vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos, **CLIP_CONFIG)
    return t5, clip, t5_config, clip_config


def stage_text(args) -> None:
    """T5 and CLIP pre-trained to read the scene from the captions (see above), in the Hugging Face layout."""
    if (args.out / "text_encoder_2" / "model.safetensors").is_file() and not args.force:
        print("exists, skipped")
        return
    from flux.weights.tokenizers import CLIPTokenizer, T5Tokenizer

    seed = seeded(args.seed, "text")
    t5, clip, t5_config, clip_config = text_encoders(args.out)
    t5_tokenizer = T5Tokenizer.from_folder(args.out / "tokenizer_2", max_length=MAX_SEQUENCE_LENGTH)
    clip_tokenizer = CLIPTokenizer.from_folder(args.out / "tokenizer")
    t5_heads, t5_mean_heads, clip_heads = SceneHeads(T5_CONFIG["d_model"]), SceneHeads(T5_CONFIG["d_model"]), \
        SceneHeads(CLIP_CONFIG["hidden_size"])
    modules = torch.nn.ModuleList([t5, clip, t5_heads, t5_mean_heads, clip_heads])
    optimizer = torch.optim.AdamW(modules.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1, (step + 1) / 50)
                                                 * 0.5 * (1 + math.cos(math.pi * step / args.text_steps)))
    pairs = training_captions(args.text_steps * TEXT_BATCH, seed)
    held_out = heldout_captions.heldout_prompts(512, seed=12345)  # only measured, never trained on
    start = time.perf_counter()
    for step in range(args.text_steps):
        chunk = pairs[step * TEXT_BATCH : (step + 1) * TEXT_BATCH]
        labels = scene_labels([scene for scene, _ in chunk])
        texts = [text for _, text in chunk]
        states = t5(t5_tokenizer(texts))  # (B, T, D), unmasked as the pipeline runs it
        pooled = clip(until_end_of_text(clip_tokenizer(texts), clip_tokenizer.eos_token_id))  # (B, V)
        loss = scene_loss(t5_heads(states), labels) + scene_loss(t5_mean_heads(states.mean(1)), labels) + \
            scene_loss(clip_heads(pooled), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.text_steps - 1:
            with torch.no_grad():
                texts = [text for _, text in held_out]
                labels = scene_labels([scene for scene, _ in held_out])
                states = t5(t5_tokenizer(texts))
                pooled = clip(until_end_of_text(clip_tokenizer(texts), clip_tokenizer.eos_token_id))
                right = [(torch.stack([a.argmax(-1) for a in heads(x)], -1) == labels).float().mean(0)
                         for heads, x in ((t5_mean_heads, states.mean(1)), (clip_heads, pooled))]
            print(f"text step {step:5d}  loss {loss.item():.3f}  held-out accuracy (shape colour background "
                  f"position size) T5 {fmt(right[0])} CLIP {fmt(right[1])}  {time.perf_counter() - start:.0f} s",
                  flush=True)
    for name, module, config in (("text_encoder_2", t5, t5_config), ("text_encoder", clip, clip_config)):
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "config.json", config)
        save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, folder / "model.safetensors")


def until_end_of_text(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """(B, 77) CLIP ids cut after the last end-of-text token any row needs: CLIP is causal and pools at that
    token, so the padding after it changes nothing (and costs time)."""
    return ids[:, : int((ids == eos).int().argmax(1).max()) + 1]


def fmt(accuracy: torch.Tensor) -> str:
    return " ".join(f"{100 * a:.0f}" for a in accuracy.tolist())


# ---- 3. autoencoder ------------------------------------------------------------------------------------
# GroupNorm(32) sits on the main path twice, right before the latents (encoder.norm_out) and right before
# the pixels (decoder.norm_out). It removes each group's mean and scale over the picture; for a picture of
# flat colours that is the colours themselves, and a small autoencoder trained from random weights on this
# machine's budget learns to pass them through it far too slowly (we tried: after 20 minutes it drew
# coloured blobs). So the autoencoder is built, not trained, with one trained part (stage_decoder):
#
#   - every residual branch and the mid-block attention start at zero (conv2 and proj_out), so each block
#     is its shortcut, and the main path is linear up to the norm;
#   - the encoder averages 2×2 pixels at the first two downsamplings and moves each 2×2 neighbourhood into
#     channels at the third (space to depth): latent channel 3·(2·row + column) + colour holds the mean colour
#     of one 4×4-pixel quarter of the latent pixel's 8×8 patch, 12 channels in all (4 stay zero);
#   - across each norm a value v travels as the pair (ε·v, −ε·v), the two channels of one group: their mean
#     is zero, and their variance (ε² v² ≤ 1e-10) is negligible beside GroupNorm's eps (1e-6), so the norm
#     only multiplies by 1/sqrt(eps); its weight undoes that, and the next convolution takes
#     silu(v) − silu(−v) = v;
#   - the decoder starts as nearest-neighbour upsampling of each latent pixel's mean colour.
# The latents are the quarter means themselves, in [-1, 1]: the encoder's output is set so that
# `AutoEncoder.encode`'s FLUX scale and shift (0.3611, 0.1159) map it back to them.
EPSILON = 1e-5  # the pairs' scale: ε² v² ≪ the norms' eps 1e-6


def build_autoencoder() -> AutoEncoder:
    """The autoencoder described above, for AE_PARAMS' widths (64, 32, 32, 64)."""
    p = AE_PARAMS
    ae = AutoEncoder(p)
    colours, quarters = range(3), range(12)
    with torch.no_grad():
        for module in ae.modules():  # residual branches and attention output to zero: every block is its shortcut
            if hasattr(module, "conv2"):
                module.conv2.weight.zero_(), module.conv2.bias.zero_()
            if hasattr(module, "proj_out"):
                module.proj_out.weight.zero_(), module.proj_out.bias.zero_()
        encoder, decoder = ae.encoder, ae.decoder

        def copy(conv, pairs, *, tap=(1, 1), scale=1.0):
            """conv: output channel o <- scale × input channel i at kernel position `tap`, for (o, i) in pairs."""
            conv.weight.zero_()
            conv.bias.zero_()
            for out, into in pairs:
                conv.weight[(out, into, *tap) if conv.weight.shape[-1] > 1 else (out, into, 0, 0)] = scale

        def average(conv):  # a stride-2 downsampling: the mean of each 2×2 block (taps 0 and 1 of each side)
            conv.weight.zero_(), conv.bias.zero_()
            for c in colours:
                conv.weight[c, c, :2, :2] = 0.25

        copy(encoder.conv_in, [(c, c) for c in colours])
        copy(encoder.down[0].block[0].nin_shortcut, [(c, c) for c in colours])
        average(encoder.down[0].downsample.conv)
        copy(encoder.down[1].block[0].nin_shortcut, [(c, c) for c in colours])
        average(encoder.down[1].downsample.conv)
        space_to_depth = [(3 * (2 * row + column) + c, c, row, column) for row in (0, 1) for column in (0, 1) for c in colours]
        conv = encoder.down[2].downsample.conv
        conv.weight.zero_(), conv.bias.zero_()
        for out, into, row, column in space_to_depth:
            conv.weight[out, into, row, column] = 1.0
        nin = encoder.down[3].block[0].nin_shortcut  # 32 -> 64: quarter k as the pair (2k, 2k + 1)
        nin.weight.zero_(), nin.bias.zero_()
        for k in quarters:
            nin.weight[2 * k, k] = EPSILON
            nin.weight[2 * k + 1, k] = -EPSILON
        encoder.norm_out.weight.fill_(1 / (EPSILON * 1000)), encoder.norm_out.bias.zero_()  # 1000 = 1/sqrt(eps)
        conv = encoder.conv_out  # mean k = v / scale + shift, so that encode() returns v; log-variance -20
        conv.weight.zero_()
        conv.bias.zero_()
        conv.bias[: p.z_channels] = p.shift_factor
        conv.bias[p.z_channels :] = -20.0
        for k in quarters:
            conv.weight[k, 2 * k, 1, 1] = 1 / p.scale_factor
            conv.weight[k, 2 * k + 1, 1, 1] = -1 / p.scale_factor

        # Decoder: conv_in turns z back into the quarters (channels 3..14) and their mean colour (0..2).
        conv = decoder.conv_in
        conv.weight.zero_()
        conv.bias.zero_()
        for k in quarters:
            conv.weight[3 + k, k, 1, 1] = p.scale_factor
            conv.bias[3 + k] = -p.scale_factor * p.shift_factor
            conv.weight[k % 3, k, 1, 1] = p.scale_factor / 4
        for c in colours:
            conv.bias[c] = -p.scale_factor * p.shift_factor
        for level in decoder.up:
            for block in level.block:
                if not isinstance(block.nin_shortcut, torch.nn.Identity):
                    width = min(block.nin_shortcut.weight.shape[:2])
                    copy(block.nin_shortcut, [(c, c) for c in range(width)])
            if not isinstance(level.upsample, torch.nn.Identity):
                copy(level.upsample.conv, [(c, c) for c in range(level.upsample.conv.weight.shape[0])])
        nin = decoder.up[0].block[0].nin_shortcut  # 32 -> 64: colour c as the pair (2c, 2c + 1)
        nin.weight.zero_(), nin.bias.zero_()
        for c in colours:
            nin.weight[2 * c, c] = EPSILON
            nin.weight[2 * c + 1, c] = -EPSILON
        decoder.norm_out.weight.fill_(1 / (EPSILON * 1000)), decoder.norm_out.bias.zero_()
        conv = decoder.conv_out
        conv.weight.zero_(), conv.bias.zero_()
        for c in colours:
            conv.weight[c, 2 * c, 1, 1] = 1.0
            conv.weight[c, 2 * c + 1, 1, 1] = -1.0
    return ae


def stage_ae(args) -> None:
    """Builds the autoencoder (see above); the decoder is refined later, in stage_decoder."""
    if (args.out / "ae.safetensors").is_file() and not args.force:
        print("exists, skipped")
        return
    seeded(args.seed, "ae")  # the untouched convolutions inside the residual branches keep their random start
    ae = build_autoencoder()
    x, _ = shapes.make_dataset(64, seed=args.seed, image_size=IMAGE_SIZE)
    with torch.no_grad():
        latents = ae.encode(x)
        error = (ae.decode(latents) - x).abs().mean().item()
    print(f"built; latents mean {latents[:, :12].mean():+.3f} std {latents[:, :12].std():.3f}; "
          f"reconstruction L1 {error:.4f}", flush=True)
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, args.out / "ae.safetensors")


# ---- 4. cache ------------------------------------------------------------------------------------------

def stage_cache(args) -> None:
    """The training set through the frozen parts, loaded from the files just written, as the pipeline loads
    them: each picture's latents and `--captions-per-image` of its captions (`captions.describe`)."""
    path = args.work / "cache.pt"
    if path.is_file() and not args.force:
        print("exists, skipped")
        return
    rng, noise = random.Random(seeded(args.seed, "cache")), noise_words()
    scenes = [shapes.random_scene(rng) for _ in range(args.train_images)]
    images = torch.from_numpy(np.stack([np.asarray(shapes.render(scene, image_size=IMAGE_SIZE, rng=rng))
                                        for scene in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W)
    texts = [captions.describe(scene, rng, noise_words=noise) for scene in scenes for _ in range(args.captions_per_image)]
    ae = load_autoencoder(args.out, dtype=torch.float32).to(memory_format=torch.channels_last)  # faster on CPUs
    latents = encode_images(ae, images, batch_size=64)
    print(f"latents {tuple(latents.shape)}, mean {latents.mean():+.3f}, std {latents.std():.3f}", flush=True)
    t5 = load_t5(args.out, max_length=MAX_SEQUENCE_LENGTH, dtype=torch.float32)
    clip = load_clip(args.out, dtype=torch.float32)
    txt, vec = encode_captions(t5, clip, texts, batch_size=256)
    caption_index = torch.arange(len(texts)).reshape(len(scenes), args.captions_per_image)  # (N, K)
    torch.save(dict(latents=latents, txt=txt.half(), vec=vec, caption_index=caption_index), path)  # fp16: half the RAM
    print(f"{len(scenes)} images, {len(texts)} captions", flush=True)


# ---- 5. flow -------------------------------------------------------------------------------------------

def stage_flow(args) -> None:
    """Trains the transformer with the rectified-flow loss; checkpoints every 100 steps and resumes from them."""
    checkpoint_path = args.work / "flow.pt"
    data = torch.load(args.work / "cache.pt")
    latents, txt, vec, caption_index = data["latents"], data["txt"], data["vec"], data["caption_index"]
    seed = seeded(args.seed, "flow")
    model = Flux(FLOW_PARAMS)
    if args.init is not None and not checkpoint_path.is_file():
        start_from(model, args.init)
    ema = Flux(FLOW_PARAMS).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-3, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = 30
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1, (step + 1) / warmup)
                                                 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.flow_steps))))
    generator = torch.Generator().manual_seed(seed)
    step = 0
    if checkpoint_path.is_file() and not args.force:
        state = torch.load(checkpoint_path)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        step = state["step"]
        print(f"resumed at step {step}", flush=True)
    print(f"transformer: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)
    batch, start, running = 32, time.perf_counter(), None
    while step < args.flow_steps:
        rows = torch.randint(0, len(latents), (batch,), generator=generator)
        x0 = latents[rows]
        noise = torch.randn(x0.shape, generator=generator)
        # Uniform times: with a few sampling steps, the first one (from pure noise, t = 1) decides the layout,
        # so the ends of the path must be trained as often as the middle.
        t = sample_timesteps(batch, method="uniform", generator=generator)
        # One of each picture's captions, a different phrasing at each visit.
        chosen = caption_index[rows, torch.randint(0, caption_index.shape[1], (batch,), generator=generator)]
        loss = rectified_flow_loss(model, x0, txt[chosen].float(), vec[chosen], t, noise=noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        decay = min(0.995, (1 + step) / (10 + step))  # short training: a short average, warmed up
        with torch.no_grad():
            for average, current in zip(ema.parameters(), model.parameters()):
                average.lerp_(current, 1 - decay)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 25 == 0:
            elapsed = time.perf_counter() - start
            print(f"flow step {step:5d}  loss {running:.4f}  lr {schedule.get_last_lr()[0]:.1e}  {elapsed:.0f} s", flush=True)
        if step % 100 == 0 or step == args.flow_steps:
            torch.save(dict(model=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                            schedule=schedule.state_dict(), generator=generator.get_state(), step=step),
                       checkpoint_path.with_suffix(".tmp"))
            checkpoint_path.with_suffix(".tmp").replace(checkpoint_path)


def start_from(model: Flux, path: Path) -> None:
    """Starts `model` from an earlier transformer file: every tensor of the same shape, except the two input
    layers that read the text encoders (`txt_in`, `vector_in.in_layer`), which stay freshly initialised
    because the encoders they were trained on are not these."""
    from safetensors.torch import load_file

    earlier, own = load_file(path), model.state_dict()
    kept = {name: tensor for name, tensor in earlier.items() if name in own and own[name].shape == tensor.shape
            and not name.startswith(("txt_in.", "vector_in.in_layer."))}
    model.load_state_dict(kept, strict=False)
    print(f"started from {path}: {len(kept)} of {len(own)} tensors", flush=True)


# ---- 6. decoder ----------------------------------------------------------------------------------------

def stage_decoder(args) -> None:
    """Fine-tunes the autoencoder's decoder alone, the encoder (and so the cached latents
    the transformer learns from) unchanged. Independent of the flow stage: the two may run side by side."""
    done = args.work / "decoder.done"
    if done.is_file() and not args.force:
        print("exists, skipped")
        return
    seed = seeded(args.seed, "decoder")
    rng, noise = random.Random(seed), torch.Generator().manual_seed(seed)
    ae = load_autoencoder(args.out, dtype=torch.float32).to(memory_format=torch.channels_last)
    # Trained: everything before the full-size level. Kept as built: that level, whose shortcut hands the
    # colours to the norm as pairs, and the norm and convolution that read them out.
    ae.requires_grad_(False)
    trained = [ae.decoder.conv_in, ae.decoder.mid, *ae.decoder.up[1:]]
    for module in trained:
        module.requires_grad_(True)
    optimizer = torch.optim.Adam([p for module in trained for p in module.parameters()], lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / args.decoder_steps)))
    start = time.perf_counter()
    for step in range(args.decoder_steps):
        batch, size = (4, IMAGE_SIZE) if step % 4 == 3 else (16, IMAGE_SIZE // 2)  # as in stage_ae
        x, _ = shapes.make_dataset(batch, seed=rng.randrange(2**31), image_size=size)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            latents = ae.encode(x)
        # A little noise on the latents: the transformer's will not be exact.
        reconstruction = ae.decode(latents + 0.05 * torch.randn(latents.shape, generator=noise))
        loss = F.l1_loss(reconstruction, x) + F.mse_loss(reconstruction, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == args.decoder_steps - 1:
            print(f"decoder step {step:4d}  l1 {F.l1_loss(reconstruction, x).item():.4f}  {time.perf_counter() - start:.0f} s", flush=True)
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, args.out / "ae.safetensors")
    done.touch()


# ---- 7. export -----------------------------------------------------------------------------------------

def stage_export(args) -> None:
    """The EMA transformer as the top-level single file, and the repository's description files."""
    state = torch.load(args.work / "flow.pt")
    print(f"exporting the transformer after {state['step']} steps", flush=True)
    save_file({k: v.contiguous() for k, v in state["ema"].items()}, args.out / "flux1-tiny.safetensors")  # fp32: small
    # The sampling defaults (read by flux.pipelines.pipeline.sampling_defaults): the pipeline's own description.
    write_json(args.out / "flux_defaults.json", asdict(SAMPLING))
    # diffusers' pipeline description, as in the official repository. The transformer and autoencoder are the
    # top-level single files (Black Forest Labs' layout), not diffusers folders, hence null.
    write_json(args.out / "model_index.json", {
        "_class_name": "FluxPipeline", "_diffusers_version": "0.35.0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": [None, None], "vae": [None, None],
    })
    (args.out / "scheduler").mkdir(exist_ok=True)
    write_json(args.out / "scheduler" / "scheduler_config.json", {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
        "use_dynamic_shifting": SAMPLING.shift_schedule, "base_shift": SAMPLING.base_shift,
        "max_shift": SAMPLING.max_shift, "base_image_seq_len": 256, "max_image_seq_len": 4096,
    })


def write_json(path: Path, content) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
