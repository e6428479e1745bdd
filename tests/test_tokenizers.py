"""flux/weights/tokenizers.py against transformers' `T5TokenizerFast` and `CLIPTokenizer`, the tokenizers the official
pipeline calls (`padding="max_length", max_length=..., truncation=True`), on folders laid out like FLUX.1's
`tokenizer/` (vocab.json + merges.txt, 49408 tokens) and `tokenizer_2/` (spiece.model and/or tokenizer.json).

The vocabularies are trained here, deterministically, on generated multilingual text: a BPE of CLIP's real
size with the `tokenizers` trainer, a small sentencepiece unigram model with T5's conventions. Beyond parity:
batches are their rows, truncation warns with transformers' count and keeps the closing token, and every
broken folder, file or prompt fails with a message that names it.
"""

import io
import json
import logging
import random
import re
import shutil

import pytest
import torch

from flux.weights.checkpoint import CheckpointError
from flux.weights.tokenizers import CLIPTokenizer, T5Tokenizer

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


# ---- T5: a sentencepiece unigram model with T5's conventions, as spiece.model and as tokenizer.json ----

T5_PIECES = 3000  # sentencepiece pieces; the 100 sentinels <extra_id_N> come after them
T5_SOURCES = ("spiece.model", "tokenizer.json")


@pytest.fixture(scope="module")
def t5_folders(tmp_path_factory):
    """Two `tokenizer_2/` folders: one with only the `spiece.model` sentencepiece trains (FLUX.1's repository
    has this file), one with what transformers' `T5TokenizerFast` saves from it (tokenizer.json and
    tokenizer_config.json, as transformers 5 writes them)."""
    import sentencepiece
    from transformers import T5TokenizerFast

    model = io.BytesIO()
    # T5's conventions: <pad> 0, </s> 1, <unk> 2, no <s>; nmt_nfkc normalisation (sentencepiece's default, and
    # T5's). Coverage keeps all but the rarest characters, so the CJK and emoji prompts have pieces and the
    # control characters stay unknown. One thread: the trained model depends on the thread count.
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(generated_text(1000, seed=1)), model_writer=model, model_type="unigram",
        vocab_size=T5_PIECES, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=0.9999, num_threads=1,
        minloglevel=2)
    root = tmp_path_factory.mktemp("t5")
    folders = {source: root / source / "tokenizer_2" for source in T5_SOURCES}
    folders["spiece.model"].mkdir(parents=True)
    (folders["spiece.model"] / "spiece.model").write_bytes(model.getvalue())
    T5TokenizerFast.from_pretrained(folders["spiece.model"], extra_ids=100).save_pretrained(folders["tokenizer.json"])
    assert sorted(path.name for path in folders["tokenizer.json"].iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    return folders


@pytest.fixture(scope="module")
def t5_reference(t5_folders):
    from transformers import T5TokenizerFast

    references = {source: T5TokenizerFast.from_pretrained(folder) for source, folder in t5_folders.items()}
    for reference in references.values():
        assert len(reference) == T5_PIECES + 100
        assert (reference.pad_token_id, reference.eos_token_id, reference.unk_token_id) == (0, 1, 2)
        # The corpus was meant to cover these scripts: if they became <unk>, the parity below would test little.
        covered = reference(PROMPTS["japanese"] + PROMPTS["korean-chinese"] + PROMPTS["emoji"] + PROMPTS["scripts"]).input_ids
        assert reference.unk_token_id not in covered
    return references


@pytest.fixture(scope="module")
def t5(t5_folders):
    """Ours from each folder, at schnell's length and at a short one that truncates most of the corpus."""
    return {(source, max_length): T5Tokenizer.from_folder(t5_folders[source], max_length=max_length)
            for source in T5_SOURCES for max_length in (256, 8)}


@pytest.mark.parametrize("max_length", [256, 8])
@pytest.mark.parametrize("source", T5_SOURCES)
@pytest.mark.parametrize("prompt", PROMPTS.values(), ids=PROMPTS.keys())
def test_t5_matches_transformers(t5, t5_reference, prompt, source, max_length):
    assert_same_ids(t5[source, max_length]([prompt]), reference_ids(t5_reference[source], [prompt], max_length), [prompt])


@pytest.mark.parametrize("max_length", [512, 8])
def test_t5_max_length_per_call_matches_transformers(t5, t5_reference, max_length):
    """FLUX.1-dev reads 512 tokens: the call's max_length overrides the tokenizer's, the whole corpus at once."""
    prompts = list(PROMPTS.values())
    expected = reference_ids(t5_reference["spiece.model"], prompts, max_length)
    assert_same_ids(t5["spiece.model", 256](prompts, max_length=max_length), expected, prompts)


# ---- invariants: batches, truncation ----

def ours_and_reference(request, name: str, max_length: int):
    """Our tokenizer at `max_length` and transformers' from the same folder (T5: the spiece.model one)."""
    if name == "t5":
        return request.getfixturevalue("t5")["spiece.model", max_length], request.getfixturevalue("t5_reference")["spiece.model"]
    return request.getfixturevalue("clip")[max_length], request.getfixturevalue("clip_reference")


@pytest.mark.parametrize("name, max_length", [("t5", 256), ("t5", 8), ("clip", 77), ("clip", 8)])
def test_batch_rows_are_the_prompts_one_by_one(request, name, max_length):
    tokenizer, _ = ours_and_reference(request, name, max_length)
    prompts = list(PROMPTS.values())
    batch = tokenizer(prompts)
    assert batch.dtype == torch.long and batch.shape == (len(prompts), max_length)
    for row, prompt in enumerate(prompts):
        assert torch.equal(batch[row], tokenizer([prompt])[0]), f"prompt {prompt[:60]!r} differs inside the batch"
    assert torch.equal(tokenizer(tuple(prompts)), batch)
    for prompt in PROMPTS.values():  # a single str is a batch of one
        assert torch.equal(tokenizer(prompt), tokenizer([prompt]))


@pytest.mark.parametrize("words", range(1, 12))
@pytest.mark.parametrize("name", ["t5", "clip"])
def test_truncation_warns_with_the_number_of_dropped_tokens(request, caplog, name, words):
    """Around the limit (8): a prompt that fits, even exactly, logs nothing; one over it logs one warning whose
    count is transformers' own: its untruncated length (special tokens included) minus max_length."""
    tokenizer, reference = ours_and_reference(request, name, 8)
    prompt = " ".join(["a"] * words)
    total = len(reference(prompt).input_ids)  # transformers without truncation
    with caplog.at_level(logging.DEBUG, logger="flux.weights.tokenizers"):
        ids = tokenizer(["a cat", prompt])  # prompt 0 fits: only prompt 1 may warn
    records = [record for record in caplog.records if record.name == "flux.weights.tokenizers"]
    if total <= 8:
        assert records == [], [record.getMessage() for record in records]
        return
    assert [record.levelno for record in records] == [logging.WARNING], [record.getMessage() for record in records]
    message = records[0].getMessage()
    assert re.search(rf"\bprompt 1 has {total} tokens\b.*\bdropped the last {total - 8}\b", message), message
    # The truncated row is full and still ends with </s> / <|endoftext|>, as transformers' does.
    assert ids[1, -1].item() == reference.eos_token_id
    assert ids[1].tolist() == reference_ids(reference, [prompt], 8)[0].tolist()


@pytest.mark.parametrize("name, max_length", [("t5", 256), ("clip", 77)])
def test_truncation_at_the_official_length(request, caplog, name, max_length):
    tokenizer, reference = ours_and_reference(request, name, max_length)
    total = len(reference(PROMPTS["long-prose"]).input_ids)
    assert total > max_length
    with caplog.at_level(logging.WARNING, logger="flux.weights.tokenizers"):
        ids = tokenizer(PROMPTS["long-prose"])
    (record,) = [record for record in caplog.records if record.name == "flux.weights.tokenizers"]
    assert f"dropped the last {total - max_length}:" in record.getMessage(), record.getMessage()
    last_non_pad = ids[0][ids[0] != reference.pad_token_id][-1] if name == "t5" else ids[0, -1]  # CLIP pads with its eos
    assert last_non_pad.item() == reference.eos_token_id


# ---- errors: each names what is wrong and where ----

TOKENIZERS = {"t5": T5Tokenizer, "clip": CLIPTokenizer}


@pytest.mark.parametrize("name", TOKENIZERS)
def test_missing_folder(tmp_path, name):
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'nowhere'}: ") + ".*folder not found"):
        TOKENIZERS[name].from_folder(tmp_path / "nowhere")


@pytest.mark.parametrize("name, expected", [("t5", "tokenizer.json or spiece.model"), ("clip", "missing vocab.json and merges.txt")])
def test_folder_without_tokenizer_files(tmp_path, name, expected):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path}: ") + ".*" + re.escape(expected)):
        TOKENIZERS[name].from_folder(tmp_path)


def test_the_other_tokenizers_folder(t5_folders, clip_folder):
    """tokenizer/ and tokenizer_2/ swapped: each says what it expected."""
    with pytest.raises(CheckpointError, match=re.escape(f"{clip_folder}: no T5 tokenizer here")):
        T5Tokenizer.from_folder(clip_folder)
    with pytest.raises(CheckpointError, match=re.escape(f"{t5_folders['tokenizer.json'] / 'tokenizer.json'}: expected a BPE "
                                                        "tokenizer, found model type 'Unigram'")):
        CLIPTokenizer.from_folder(t5_folders["tokenizer.json"])


def sentencepiece_pieces_only(model: bytes) -> bytes:
    """The model with only its pieces: sentencepiece's own schema (sentencepiece_model.proto) serialises the
    pieces first, so this is the file cut short right after them, as an interrupted download can be."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    proto.ClearField("trainer_spec")
    proto.ClearField("normalizer_spec")
    cut = proto.SerializeToString()
    assert model.startswith(cut) and len(cut) < len(model)
    return cut


def sentencepiece_with_first_pieces(model: bytes, first: tuple[str, str, str]) -> bytes:
    """The model with other texts for its first three pieces (T5's are <pad>, </s>, <unk>)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    for piece, text in zip(proto.pieces, first):
        piece.piece = text
    return proto.SerializeToString()


CORRUPT_SPIECE = {
    "empty": lambda model: b"",
    "random-bytes": lambda model: random.Random(0).randbytes(len(model)),
    "git-lfs-pointer": lambda model: f"version https://git-lfs.github.com/spec/v1\noid sha256:{'0' * 64}\nsize {len(model)}\n".encode(),
    "cut-in-half": lambda model: model[: len(model) // 2],
    "cut-after-the-pieces": sentencepiece_pieces_only,
}


@pytest.mark.parametrize("corrupt", CORRUPT_SPIECE.values(), ids=CORRUPT_SPIECE.keys())
def test_corrupt_spiece_model(tmp_path, t5_folders, corrupt):
    model = (t5_folders["spiece.model"] / "spiece.model").read_bytes()
    (tmp_path / "spiece.model").write_bytes(corrupt(model))
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'spiece.model'}: not ")):
        T5Tokenizer.from_folder(tmp_path)


@pytest.mark.parametrize("first, expected", [
    (("<unk>", "<s>", "</s>"), "the special token '<pad>' is not in the vocabulary"),  # sentencepiece's defaults
    (("<pad>", "<unk>", "</s>"), "a T5 vocabulary starts with ('<pad>', '</s>', '<unk>') (ids 0, 1, 2)"),
], ids=["sentencepiece-defaults", "swapped"])
def test_spiece_model_without_t5_conventions(tmp_path, t5_folders, first, expected):
    model = (t5_folders["spiece.model"] / "spiece.model").read_bytes()
    (tmp_path / "spiece.model").write_bytes(sentencepiece_with_first_pieces(model, first))
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path}: {expected}")):
        T5Tokenizer.from_folder(tmp_path)


def edit_json(path, change):
    content = json.loads(path.read_text(encoding="utf-8"))
    change(content)
    path.write_text(json.dumps(content), encoding="utf-8")


CORRUPT_TOKENIZER_JSON = {
    "cut-short": (lambda path: path.write_text(path.read_text(encoding="utf-8")[:5000], encoding="utf-8"), "not valid JSON"),
    "not-utf8": (lambda path: path.write_bytes(random.Random(0).randbytes(1000)), "not valid JSON"),
    "not-an-object": (lambda path: path.write_text("[]"), "expected a JSON object, got list"),
    "wrong-model-type": (lambda path: edit_json(path, lambda content: content["model"].update(type="WordPiece")),
                         "expected a Unigram tokenizer, found model type 'WordPiece'"),
    "no-model": (lambda path: edit_json(path, lambda content: content.pop("model")), "expected a Unigram tokenizer, found model type None"),
    "no-vocab": (lambda path: edit_json(path, lambda content: content["model"].pop("vocab")), "the Unigram model has no vocab"),
}


@pytest.mark.parametrize("corrupt, expected", CORRUPT_TOKENIZER_JSON.values(), ids=CORRUPT_TOKENIZER_JSON.keys())
def test_corrupt_tokenizer_json(tmp_path, t5_folders, corrupt, expected):
    folder = shutil.copytree(t5_folders["tokenizer.json"], tmp_path / "tokenizer_2")
    corrupt(folder / "tokenizer.json")
    with pytest.raises(CheckpointError, match=re.escape(f"{folder / 'tokenizer.json'}: {expected}")):
        T5Tokenizer.from_folder(folder)


@pytest.mark.parametrize("file", ["vocab.json", "merges.txt", "tokenizer_config.json"])
def test_corrupt_clip_files(tmp_path, clip_folder, file):
    folder = shutil.copytree(clip_folder, tmp_path / "tokenizer")
    (folder / file).write_bytes(random.Random(0).randbytes(1000))
    with pytest.raises(CheckpointError, match=re.escape(str(folder)) + ".*" + re.escape(file)):
        CLIPTokenizer.from_folder(folder)


@pytest.mark.parametrize("prompts, culprit", [(None, "prompts"), (42, "prompts"), ({"a": 1}, "prompts"), ([1], r"prompts\[0\]"),
                                              (["fine", None], r"prompts\[1\]"), ([b"bytes"], r"prompts\[0\]")])
@pytest.mark.parametrize("name", ["t5", "clip"])
def test_non_str_prompt(request, name, prompts, culprit):
    tokenizer, _ = ours_and_reference(request, name, 8)
    with pytest.raises(TypeError, match=rf"^{culprit} must be"):
        tokenizer(prompts)


@pytest.mark.parametrize("prompts, culprit", [("\ud800", 0), (["fine", "a\udfffb"], 1)])
@pytest.mark.parametrize("name", ["t5", "clip"])
def test_lone_surrogate_prompt(request, name, prompts, culprit):
    tokenizer, _ = ours_and_reference(request, name, 8)
    with pytest.raises(ValueError, match=rf"^prompts\[{culprit}\] is not valid Unicode"):
        tokenizer(prompts)


@pytest.mark.parametrize("max_length", [1, 0, -5, 8.0, True, "256"])
def test_t5_max_length_too_small_or_not_an_integer(t5, t5_folders, max_length):
    """T5 needs room for </s> and one token; CLIP (below) for its two markers and one."""
    with pytest.raises(ValueError, match="max_length must be an integer above 1"):
        T5Tokenizer.from_folder(t5_folders["spiece.model"], max_length=max_length)
    with pytest.raises(ValueError, match="max_length must be an integer above 1"):
        t5["spiece.model", 256](PROMPTS["plain"], max_length=max_length)


@pytest.mark.parametrize("max_length", [2, 1, 77.0])
def test_clip_max_length_too_small_or_not_an_integer(clip_folder, max_length):
    with pytest.raises(ValueError, match="max_length must be an integer above 2"):
        CLIPTokenizer.from_folder(clip_folder, max_length=max_length)
