"""The two tokenizers of FLUX.1: T5's sentencepiece unigram model and CLIP's byte-level BPE.

Each turns a batch of prompts into the fixed-length id rows the text encoders read, exactly as the official
pipeline calls transformers 5 (`padding="max_length", truncation=True, max_length=...`):
  - T5 (`tokenizer_2/`): the prompt's pieces, then `</s>`, padded with `<pad>` to 256 (schnell) or 512 (dev);
  - CLIP (`tokenizer/`): `<|startoftext|>`, the prompt's BPE tokens, `<|endoftext|>`, padded to 77 with the
    pad token the folder names (FLUX.1's is `<|endoftext|>` itself).
A prompt too long loses its last tokens, never the closing `</s>` or `<|endoftext|>`, and a warning says how
many were dropped. Output matches transformers' `T5TokenizerFast` and `CLIPTokenizer` (tests/test_tokenizers.py).

The normalisation, pre-tokenisation and model are the `tokenizers` library's primitives, configured as
transformers 5 configures them in its T5 and CLIP classes. transformers 5 rebuilds that pipeline in code and
takes only the vocabulary from the folder's files, even from a `tokenizer.json` that spells a different
pipeline (FLUX.1's own, written by transformers 4, also collapses repeated spaces in its normaliser); we do
the same. Special tokens are added in Python rather than by a post-processor, so the truncation is
explicit and its count exact.

transformers 5 only ships these fast tokenizers. Its 4.x "slow" CLIP tokenizer (the one the original
FLUX.1 code used) also ran ftfy and HTML unescaping, so it differed on prompts like "&amp;" and rare Unicode.
"""

import base64
import logging
import os
import re
import struct
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

from flux.weights.checkpoint import CheckpointError, read_json_object

log = logging.getLogger(__name__)

# T5's conventions, fixed by its sentencepiece training: these three pieces open the vocabulary.
T5_SPECIAL_PIECES = ("<pad>", "</s>", "<unk>")
# What CLIP (Radford et al., 2021) splits a lower-cased prompt into before BPE: its two markers, English
# contractions, runs of letters, single digits, and runs of anything else but whitespace, which is dropped.
CLIP_PIECES = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"


class T5Tokenizer:
    """T5's sentencepiece unigram tokenizer, as transformers 5's `T5TokenizerFast` runs it."""

    def __init__(self, *, pieces: list[tuple[str, float]], precompiled_charsmap: bytes | None,
                 added_tokens: list[AddedToken], max_length: int = 256):
        """`pieces` are (text, log-probability) with `<pad>`, `</s>`, `<unk>` first; `precompiled_charsmap` is
        sentencepiece's compiled normalisation table (NFKC plus its own rules) or None for none."""
        if [piece for piece, _ in pieces[:3]] != list(T5_SPECIAL_PIECES):
            raise ValueError(f"a T5 vocabulary starts with {T5_SPECIAL_PIECES} (ids 0, 1, 2), "
                             f"got {[piece for piece, _ in pieces[:3]]}")
        _check_max_length(max_length, special_tokens=1)
        self.max_length = max_length
        self.pad_token_id, self.eos_token_id = 0, 1
        try:
            backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
            if precompiled_charsmap:
                backend.normalizer = normalizers.Precompiled(precompiled_charsmap)
        except Exception as error:  # the tokenizers library raises a bare Exception for data it cannot use
            raise ValueError(f"the vocabulary or normalisation table is unusable ({error})") from None
        # Words are split on whitespace (so runs of it count once), and each gets sentencepiece's "▁" in front,
        # also the first word and a word right after a special token.
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ])
        # Special tokens written in a prompt ("</s>", "<extra_id_0>") are matched whole, before the normaliser.
        backend.add_tokens(added_tokens)
        self.backend = backend

    @classmethod
    def from_folder(cls, path: str | os.PathLike, *, max_length: int = 256) -> "T5Tokenizer":
        """The tokenizer of a `tokenizer_2/` folder: its `tokenizer.json` or, failing that, its `spiece.model`.

        transformers reads `tokenizer.json` when both are there, so we do too (in FLUX.1's folder they hold
        the same vocabulary). Sentinels `<extra_id_N>` the config counts (`extra_ids`, 100) follow the
        sentencepiece pieces, highest first, as T5 numbers them (`<extra_id_0>` is id 32099).
        """
        _check_max_length(max_length, special_tokens=1)
        folder = _check_folder(path, "T5", "tokenizer.json or spiece.model")
        config = _read_config(folder)
        if (folder / "tokenizer.json").is_file():
            model, normalizer = _read_tokenizer_json(folder / "tokenizer.json", model_type="Unigram")
            entries = model["vocab"]
            if not (isinstance(entries, list) and all(
                    isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                    and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool) for entry in entries)):
                raise CheckpointError(f"{folder / 'tokenizer.json'}: the Unigram vocab must be a list of [piece, score] "
                                      "pairs, a string and a number each; re-download it")
            pieces = [(piece, float(score)) for piece, score in entries]
            precompiled_charsmap = _find_precompiled_charsmap(folder / "tokenizer.json", normalizer)
            kept_pieces = []
        elif (folder / "spiece.model").is_file():
            spm_pieces, precompiled_charsmap = _read_sentencepiece_model(folder / "spiece.model")
            extra_ids = config.get("extra_ids", 100)
            if not (type(extra_ids) is int and 0 <= extra_ids <= 10_000):  # T5's is 100; a corrupt 10⁹ would not end
                raise CheckpointError(f"{folder / 'tokenizer_config.json'}: extra_ids = {extra_ids!r:.80}, expected an "
                                      "integer from 0 to 10000 (T5 has 100)")
            pieces = [(piece, score) for piece, score, _ in spm_pieces]
            pieces += [(f"<extra_id_{n}>", 0.0) for n in reversed(range(extra_ids))]
            # Control and user-defined pieces are matched whole, as sentencepiece itself does.
            kept_pieces = [piece for piece, _, kind in spm_pieces if kind in (SPM_CONTROL, SPM_USER_DEFINED)]
        else:
            raise CheckpointError(f"{folder}: no T5 tokenizer here (expected tokenizer.json or spiece.model)")
        vocab = {piece: index for index, (piece, _) in enumerate(pieces)}
        sentinels = [piece for piece in vocab if re.fullmatch(r"<extra_id_\d+>", piece)]
        added_tokens = _added_tokens(folder, [*T5_SPECIAL_PIECES, *sentinels, *kept_pieces], config, vocab)
        try:
            return cls(pieces=pieces, precompiled_charsmap=precompiled_charsmap, added_tokens=added_tokens,
                       max_length=max_length)
        except ValueError as error:  # max_length was checked above: this is the folder's fault
            raise CheckpointError(f"{folder}: {error}") from None

    def __call__(self, prompts: list[str] | str, *, max_length: int | None = None) -> torch.Tensor:
        """B prompts (a single str is a batch of one) -> (B, max_length) int64 ids: pieces, `</s>`, `<pad>`s.

        `max_length` overrides the tokenizer's own for this call (FLUX.1-dev reads 512 tokens, schnell 256)."""
        if max_length is not None:
            _check_max_length(max_length, special_tokens=1)
        return _encode(self.backend, prompts, before=[], after=[self.eos_token_id], pad_token_id=self.pad_token_id,
                       max_length=max_length or self.max_length, name="T5")


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer, as transformers 5's `CLIPTokenizer` runs it."""

    def __init__(self, *, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str,
                 added_tokens: list[AddedToken], max_length: int = 77):
        for role, token in (("bos", "<|startoftext|>"), ("eos", "<|endoftext|>"), ("pad", pad_token)):
            if token not in vocab:
                raise ValueError(f"the {role} token {token!r} is not in the vocabulary")
        _check_max_length(max_length, special_tokens=2)
        self.max_length = max_length
        self.bos_token_id, self.eos_token_id = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
        self.pad_token_id = vocab[pad_token]
        # Each word's last symbol carries "</w>", so "a" inside a word and "a</w>" ending one are different
        # tokens. Every byte is in the vocabulary, so the unknown token is never used.
        try:
            backend = Tokenizer(models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="",
                                           end_of_word_suffix="</w>", fuse_unk=False, unk_token="<|endoftext|>"))
        except Exception as error:  # the tokenizers library raises a bare Exception for data it cannot use
            raise ValueError(f"the vocabulary and merges do not fit together ({error})") from None
        # Unicode composition, every run of whitespace (tabs, newlines, U+3000 ...) to one space, lower case.
        # The original also stripped the ends; the pre-tokeniser drops all spaces anyway.
        backend.normalizer = normalizers.Sequence([
            normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase(),
        ])
        # CLIP's pieces, then each piece's UTF-8 bytes as GPT-2's printable stand-ins (a byte-level BPE sees
        # bytes, so no character is unknown). ByteLevel also applies GPT-2's own split (use_regex), which
        # transformers keeps; on CLIP's pieces it changes nothing we know of, but we run it to stay exact.
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_PIECES), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        # "<|endoftext|>" written in a prompt becomes the token itself (and ends CLIP's pooled read-out there).
        backend.add_tokens(added_tokens)
        self.backend = backend

    @classmethod
    def from_folder(cls, path: str | os.PathLike, *, max_length: int = 77) -> "CLIPTokenizer":
        """The tokenizer of a `tokenizer/` folder: `vocab.json` + `merges.txt` (the official layout), or the
        `tokenizer.json` transformers 5 saves (read first when present, as transformers does).

        The pad token is `tokenizer_config.json`'s `pad_token`, else `special_tokens_map.json`'s (transformers'
        order), else `<|endoftext|>`.
        """
        _check_max_length(max_length, special_tokens=2)
        folder = _check_folder(path, "CLIP", "vocab.json and merges.txt, or tokenizer.json")
        config = _read_config(folder)
        if (folder / "tokenizer.json").is_file():
            model, _ = _read_tokenizer_json(folder / "tokenizer.json", model_type="BPE")
            vocab = _check_vocab(folder / "tokenizer.json", model["vocab"])
            # tokenizers ≥ 0.20 writes merges as pairs, earlier versions as "left right" strings.
            try:
                merges = [tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge) for merge in model["merges"]]
            except TypeError:  # not a list, or an entry neither a string nor a pair
                raise CheckpointError(f"{folder / 'tokenizer.json'}: the BPE merges must be a list of pairs; "
                                      "re-download it") from None
        else:
            missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
            if missing:
                raise CheckpointError(f"{folder}: no CLIP tokenizer here (missing {' and '.join(missing)}; expected "
                                      "vocab.json and merges.txt, or tokenizer.json)")
            _check_vocab(folder / "vocab.json", read_json_object(folder / "vocab.json"))  # read_file drops bad entries
            try:
                vocab, merges = models.BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
            except Exception as error:  # the library raises a bare Exception for unreadable files
                raise CheckpointError(f"{folder}: cannot read vocab.json / merges.txt ({error}); re-download them") from None
        special_tokens_map = read_json_object(folder / "special_tokens_map.json") if (folder / "special_tokens_map.json").is_file() else {}
        pad_token = config.get("pad_token") or special_tokens_map.get("pad_token") or "<|endoftext|>"
        pad_token = pad_token.get("content") if isinstance(pad_token, dict) else pad_token  # a serialised AddedToken
        if not isinstance(pad_token, str):
            raise CheckpointError(f"{folder}: the pad token {pad_token!r:.80} is not a string; re-download the configs")
        added_tokens = _added_tokens(folder, ["<|startoftext|>", "<|endoftext|>", pad_token], config, vocab)
        try:
            return cls(vocab=vocab, merges=merges, pad_token=pad_token, added_tokens=added_tokens, max_length=max_length)
        except ValueError as error:  # max_length was checked above: this is the folder's fault
            raise CheckpointError(f"{folder}: {error}") from None

    def __call__(self, prompts: list[str] | str) -> torch.Tensor:
        """B prompts (a single str is a batch of one) -> (B, max_length) int64 ids: `<|startoftext|>`, the
        prompt's tokens, `<|endoftext|>`, pad tokens."""
        return _encode(self.backend, prompts, before=[self.bos_token_id], after=[self.eos_token_id],
                       pad_token_id=self.pad_token_id, max_length=self.max_length, name="CLIP")


def _encode(backend: Tokenizer, prompts, *, before: list[int], after: list[int], pad_token_id: int,
            max_length: int, name: str) -> torch.Tensor:
    """B prompts -> (B, max_length) ids: `before`, the prompt's tokens cut to fit, `after`, then padding."""
    prompts = _check_prompts(prompts)
    room = max_length - len(before) - len(after)
    ids = torch.full((len(prompts), max_length), pad_token_id, dtype=torch.long)
    for index, encoding in enumerate(backend.encode_batch(prompts, add_special_tokens=False)):
        tokens = encoding.ids
        if len(tokens) > room:
            dropped_text = prompts[index][encoding.offsets[room][0]:]  # offsets point into the original prompt
            if len(dropped_text) > 60:
                dropped_text = dropped_text[:57] + "..."
            log.warning("%s: prompt %d has %d tokens, more than max_length %d allows; dropped the last %d: %r",
                        name, index, len(tokens) + len(before) + len(after), max_length, len(tokens) - room,
                        dropped_text)
            tokens = tokens[:room]
        row = before + tokens + after
        ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of str (or one str), got {type(prompts).__name__}")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{index}] must be a str, got {type(prompt).__name__}")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"prompts[{index}] is not valid Unicode ({error.reason} at character {error.start})") from None
    return list(prompts)


def _check_max_length(max_length, *, special_tokens: int) -> None:
    if type(max_length) is not int or max_length <= special_tokens:
        raise ValueError(f"max_length must be an integer above {special_tokens} (room for the special tokens "
                         f"and at least one more), got {max_length!r}")


# ---- reading the folder's files ----

def _check_folder(path, name: str, expected: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: {name} tokenizer folder not found (expected a folder with {expected})")
    return folder


def _read_config(folder: Path) -> dict:
    return read_json_object(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}


def _read_tokenizer_json(path: Path, *, model_type: str) -> tuple[dict, dict | None]:
    """The model section (vocabulary) and the normaliser section of a `tokenizers` library file."""
    content = read_json_object(path)
    model = content.get("model")
    if not isinstance(model, dict) or model.get("type") != model_type:
        found = model.get("type") if isinstance(model, dict) else None
        raise CheckpointError(f"{path}: expected a {model_type} tokenizer, found model type {found!r}")
    if "vocab" not in model or (model_type == "BPE" and "merges" not in model):
        raise CheckpointError(f"{path}: the {model_type} model has no {'vocab' if 'vocab' not in model else 'merges'}")
    return model, content.get("normalizer")


def _check_vocab(path: Path, vocab) -> dict[str, int]:
    """A BPE vocabulary: token -> distinct ids ≥ 0. The tokenizers library silently drops entries that are not
    integers and wraps ids past 2³², so a corrupt file would load with tokens missing or sharing an id."""
    if not (isinstance(vocab, dict) and all(type(i) is int and 0 <= i < 2**32 for i in vocab.values())):
        raise CheckpointError(f"{path}: the vocabulary must map each token to an integer id ≥ 0; re-download it")
    if len(set(vocab.values())) != len(vocab):
        raise CheckpointError(f"{path}: the vocabulary gives several tokens the same id; re-download it")
    return vocab


def _find_precompiled_charsmap(path: Path, normalizer) -> bytes | None:
    """sentencepiece's normalisation table inside a tokenizer.json normaliser (alone or in a Sequence). Any
    other normaliser there is ignored, as transformers 5 ignores it."""
    sequence = isinstance(normalizer, dict) and normalizer.get("type") == "Sequence"
    candidates = normalizer.get("normalizers") if sequence else [normalizer]
    for candidate in candidates if isinstance(candidates, list) else []:
        if isinstance(candidate, dict) and candidate.get("type") == "Precompiled" and candidate.get("precompiled_charsmap"):
            try:
                return base64.b64decode(candidate["precompiled_charsmap"], validate=True)
            except (TypeError, ValueError) as error:  # binascii.Error is a ValueError
                raise CheckpointError(f"{path}: the normalizer's precompiled_charsmap is not base64 ({error}); "
                                      "re-download it") from None
    return None


# An added token's flags and transformers' defaults for special tokens.
ADDED_TOKEN_FLAGS = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}


def _added_tokens(folder: Path, contents: list[str], config: dict, vocab: dict[str, int]) -> list[AddedToken]:
    """`contents` and the tokens `tokenizer_config.json` lists in `added_tokens_decoder`, with its flags where
    it gives them (CLIP's says `normalized: true`: "<|ENDOFTEXT|>" is lower-cased first, then matched), else
    transformers' defaults for special tokens (matched as written)."""
    entries = config.get("added_tokens_decoder", {})
    if not (isinstance(entries, dict) and all(
            isinstance(entry, dict) and isinstance(entry.get("content"), str)
            and all(type(entry.get(flag, default)) is bool for flag, default in ADDED_TOKEN_FLAGS.items())
            for entry in entries.values())):
        raise CheckpointError(f"{folder / 'tokenizer_config.json'}: added_tokens_decoder must map ids to entries with "
                              "a string 'content' and true/false flags; re-download it")
    listed = {entry["content"]: entry for entry in entries.values()}
    tokens = []
    for content in dict.fromkeys([*contents, *listed]):
        if content not in vocab:
            raise CheckpointError(f"{folder}: the special token {content!r} is not in the vocabulary")
        flags = listed.get(content, {})
        tokens.append(AddedToken(content, **{flag: flags.get(flag, default) for flag, default in ADDED_TOKEN_FLAGS.items()}))
    return tokens


# sentencepiece's piece types (sentencepiece_model.proto).
SPM_NORMAL, SPM_UNKNOWN, SPM_CONTROL, SPM_USER_DEFINED = 1, 2, 3, 4


def _read_sentencepiece_model(path: Path) -> tuple[list[tuple[str, float, int]], bytes | None]:
    """The pieces (text, score, type) and the precompiled normalisation table of a `spiece.model`.

    The file is a protocol buffer (sentencepiece_model.proto). We need three fields, so we read the wire
    format directly rather than depend on protobuf: ModelProto.pieces (field 1, repeated) are SentencePiece
    messages {piece 1, score 2, type 3}; ModelProto.normalizer_spec (field 3) holds precompiled_charsmap (2).
    The trainer always writes normalizer_spec, after the pieces: a file without it was cut short, possibly
    right between two pieces, where the wire format alone cannot tell.
    """
    try:
        pieces, normalizer_spec = [], None
        for field, value in _protobuf_fields(path.read_bytes()):
            if field == 1:
                entry = dict(_protobuf_fields(value))
                text = entry.get(1, b"").decode("utf-8")
                (score,) = struct.unpack("<f", entry.get(2, b"\0\0\0\0"))  # a 32-bit float
                pieces.append((text, score, entry.get(3, SPM_NORMAL)))
            elif field == 3:
                normalizer_spec = dict(_protobuf_fields(value))
    except (ValueError, TypeError, struct.error, AttributeError) as error:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path}: not a sentencepiece model ({error}); re-download it") from None
    if not pieces or normalizer_spec is None:
        missing = "no pieces" if not pieces else f"no normalizer spec after its {len(pieces)} pieces: truncated?"
        raise CheckpointError(f"{path}: not a complete sentencepiece model ({missing}); re-download it")
    return pieces, normalizer_spec.get(2)


def _protobuf_fields(message: bytes):
    """Yields (field number, value) of one protobuf message: an int for a varint, bytes for anything else."""
    position = 0
    while position < len(message):
        key, position = _varint(message, position)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _varint(message, position)
        elif wire_type in (1, 2, 5):  # 64-bit, length-delimited, 32-bit
            size = {1: 8, 5: 4}.get(wire_type)
            if size is None:
                size, position = _varint(message, position)
            value, position = message[position : position + size], position + size
            if position > len(message):
                raise ValueError(f"field {field} runs past the end of the data")
        else:
            raise ValueError(f"unknown protobuf wire type {wire_type}")
        yield field, value


def _varint(message: bytes, position: int) -> tuple[int, int]:
    """A base-128 integer, least significant group first, the high bit marking continuation."""
    result = shift = 0
    while True:
        if position >= len(message):
            raise ValueError("a number runs past the end of the data")
        byte = message[position]
        result |= (byte & 0x7F) << shift
        position, shift = position + 1, shift + 7
        if byte < 0x80:
            return result, position
