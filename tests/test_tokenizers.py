"""flux/tokenizers.py against transformers' `T5TokenizerFast` and `CLIPTokenizer`, the tokenizers the official
pipeline calls (`padding="max_length", max_length=..., truncation=True`), on folders laid out like FLUX.1's
`tokenizer/` (vocab.json + merges.txt, 49408 tokens) and `tokenizer_2/` (spiece.model and/or tokenizer.json).

The vocabularies are trained here, deterministically, on generated multilingual text: a BPE of CLIP's real
size with the `tokenizers` trainer, a small sentencepiece unigram model with T5's conventions.
"""

import json
import logging
import random
import shutil

import pytest
import torch

from flux.checkpoint import CheckpointError
from flux.tokenizers import CLIPTokenizer, T5Tokenizer

PROMPTS = {
    "plain": "a photo of a cat sitting on a red chair",
    "empty": "",
    "only-spaces": "   ",
    "mixed-case": "A Photo Of A CAT, iPhone McDonald's NASA",
    "accents": "café crème brûlée, naïve façade, Ångström, Straße, São Paulo, Dvořák",
    "decomposed": "cafe\u0301 and n\u0303 vs café and ñ",  # NFC composes the first pair
    "japanese": "東京の夜景、雨上がりの街。カタカナとひらがな",
    "korean-chinese": "한국어 텍스트 and 中文混合 text",
    "emoji": "emoji 🐱🐶 family 👩\u200d👩\u200d👧 flag 🏳\ufe0f\u200d🌈 sparkles ✨✨",
    "whitespace": "many    spaces\t\ttabs\nnew\r\nlines \u00a0nbsp\u3000ideographic\u2028separator  ",
    "edges": "   leading and trailing   ",
    "punctuation": "wow!!! ??? ... ---- ''quoted'' \"double\" (paren) [bracket] {brace} #tag @at a/b c\\d ~~~",
    "numbers": "numbers 1234567890 3.14159 1,000,000 -42 2nd 1st 4k 1080p",
    "contractions": "it's don't we're I've I'm you'll he'd IT'S DON'T",
    "zero-width": "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom\u2060word",
    "control": "control\x00\x01\x07\x1b[31mchars\x7f\x85end",
    "compatibility": "fullwidth ＡＢＣ１２３ ligature ﬁ circled ① unit ㎏ superscript² roman Ⅻ",
    "special-tokens": "<|endoftext|> inside <|startoftext|> text </s> and <pad> <unk> <extra_id_0>x<extra_id_99>",
    "special-upper": "<|ENDOFTEXT|> upper and <|endoftext|>glued",
    "html": "html &amp; entities &lt;b&gt; &#39;",
    "scripts": "Ελληνικά кириллица العربية עברית हिन्दी ภาษาไทย",
    "repeated": "a " * 300,
    "long-word": "x" * 1000,
    "long-prose": " ".join(["a majestic lion standing on a rock at sunset, golden light, 85mm, highly detailed"] * 40),
}
WORDS = sorted({word for prompt in PROMPTS.values() for word in prompt.split()})


def reference_ids(tokenizer, prompts, max_length):
    """How the official pipeline calls transformers' tokenizers."""
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids


def assert_same_ids(ours, expected, prompts):
    assert ours.dtype == torch.long and ours.shape == expected.shape, (ours.dtype, ours.shape, expected.shape)
    for row, prompt in enumerate(prompts):
        differ = (ours[row] != expected[row]).nonzero()
        assert len(differ) == 0, (f"prompt {prompt[:60]!r}: first difference at position {differ[0].item()}: "
                                  f"ours {ours[row].tolist()}, transformers {expected[row].tolist()}")


def generated_text(lines: int, *, seed: int) -> list[str]:
    """Deterministic multilingual text: Latin and accented syllables, Greek, Cyrillic, CJK, Hangul, emoji,
    punctuation and numbers, with the test prompts' own words frequent among them."""
    rng = random.Random(seed)
    latin, accented = "abcdefghijklmnopqrstuvwxyz", "éèêëàâäçñöüßøåæœíóúýřã" "αβγδεζηθλμνπρστφω" "абвгдежзиклмнопрстуфхцчшщыэюя"
    cjk = [chr(c) for c in [*range(0x4E00, 0x4F2C), *range(0x3041, 0x3097), *range(0x30A1, 0x30FB), *range(0xAC00, 0xAC64)]]
    symbols = [chr(c) for c in range(0x1F300, 0x1F378)] + list("!?.,;:-'\"()[]{}#@&*/+=_~<>|$%^✨")

    def word():
        kind = rng.random()
        if kind < 0.3:
            return rng.choice(WORDS)
        if kind < 0.65:
            return "".join(rng.choice(latin) for _ in range(rng.randint(2, 11)))
        if kind < 0.75:
            return "".join(rng.choice(latin + accented) for _ in range(rng.randint(2, 9)))
        if kind < 0.88:
            return "".join(rng.choice(cjk) for _ in range(rng.randint(1, 5)))
        if kind < 0.95:
            return "".join(rng.choice(symbols) for _ in range(rng.randint(1, 4)))
        return str(rng.randint(0, 99999))

    return [" ".join(word() for _ in range(20)) for _ in range(lines)]


# ---- CLIP: a byte-level BPE of the real size, in the official layout ----

CLIP_VOCAB_SIZE = 49408  # 256 bytes + 256 end-of-word bytes + 48894 merges + 2 markers


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order as CLIP's vocabulary lists them: printable
    bytes stand for themselves, the rest for code points from 256 on (OpenAI's `bytes_to_unicode`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json as FLUX.1's `tokenizer/` has
    them: 49408 tokens, `<|startoftext|>` 49406, `<|endoftext|>` 49407 (also the pad token), and its config's
    `normalized: true` on both markers."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    alphabet = byte_alphabet()
    merges_wanted = CLIP_VOCAB_SIZE - 2 * len(alphabet) - 2
    trainee = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    trainee.normalizer = normalizers.Lowercase()
    trainee.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=CLIP_VOCAB_SIZE + 1000, initial_alphabet=alphabet, end_of_word_suffix="</w>",
                                  min_frequency=0, show_progress=False)
    trainee.train_from_iterator(generated_text(3500, seed=0), trainer)
    merges = json.loads(trainee.to_str())["model"]["merges"][:merges_wanted]  # a prefix of BPE merges is a BPE
    assert len(merges) == merges_wanted, "the generated corpus is too small for the real vocabulary size"
    tokens = alphabet + [c + "</w>" for c in alphabet] + [left + right for left, right in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    assert len(vocab) == CLIP_VOCAB_SIZE

    folder = tmp_path_factory.mktemp("clip") / "tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges), encoding="utf-8")
    marker = dict(lstrip=False, normalized=True, rstrip=False, single_word=False, special=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "bos_token": "<|startoftext|>", "clean_up_tokenization_spaces": True,
        "added_tokens_decoder": {"49406": {"content": "<|startoftext|>", **marker}, "49407": {"content": "<|endoftext|>", **marker}},
        "do_lower_case": True, "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 77,
        "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer", "unk_token": "<|endoftext|>"}))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    return folder


@pytest.fixture(scope="module")
def clip_reference(clip_folder):
    from transformers import CLIPTokenizer as ReferenceCLIPTokenizer

    reference = ReferenceCLIPTokenizer.from_pretrained(clip_folder)
    assert len(reference) == CLIP_VOCAB_SIZE and reference.pad_token_id == 49407
    return reference


@pytest.fixture(scope="module")
def clip(clip_folder):
    """Ours at the official length and at a short one that truncates most of the corpus."""
    return {max_length: CLIPTokenizer.from_folder(clip_folder, max_length=max_length) for max_length in (77, 8)}


@pytest.mark.parametrize("max_length", [77, 8])
@pytest.mark.parametrize("prompt", PROMPTS.values(), ids=PROMPTS.keys())
def test_clip_matches_transformers(clip, clip_reference, prompt, max_length):
    assert_same_ids(clip[max_length]([prompt]), reference_ids(clip_reference, [prompt], max_length), [prompt])
