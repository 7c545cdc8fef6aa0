"""The vocabulary two tokenizers share: aligned (student id, teacher id) pairs for SRA's span logit distillation.

SRA's KL term (arXiv 2605.01205, sec. 3; `../shared/docs/sra-method.md` sec. 3) applies each model's LM head to
its span centres and compares the two distributions over `V_S ∩ V_T` only, softmax over that subset.

* Exact mode (the paper): a pair is a student id and a teacher id whose token strings are identical.
* Normalized mode (a documented option): a pair is two tokens that stand for the same text. Token strings are
  mapped to raw bytes first: byte-level BPE alphabets (GPT-2's `bytes_to_unicode`, `Ġ` = space) are decoded
  byte by byte; SentencePiece `▁` becomes a space and byte-fallback tokens `<0xNN>` become byte NN. Special tokens
  match only special tokens with the same content; non-special added tokens are literal text.
  Where several ids of one tokenizer stand for the same bytes (Llama's `▁` and `<0x20>`), the one kept is the
  regular token over a byte-fallback token (it is what the tokenizer emits), then the lowest id. So between two
  SentencePiece vocabularies normalized can be slightly smaller than exact (`<0x41>`/`A` become one pair, not two).

Model rows the tokenizer does not cover (padded embeddings) never appear; ids >= a model's row count are dropped.
Results are cached in-process and on disk under `cache_dir()/vocab/`, keyed by a hash of both vocabularies + mode.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

from sra_distill.data.tokenization import tokenizer_spec
from sra_distill.errors import ModelSourceError
from sra_distill.paths import cache_dir

_CACHE_FORMAT = 1  # bump when the pairing rules change, so stale disk caches are not reused
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_memory_cache: dict[str, "SharedVocab"] = {}


@dataclass(frozen=True)
class SharedVocab:
    """Aligned id pairs: `student_ids[i]` and `teacher_ids[i]` are the same token; sorted by student id."""

    student_ids: torch.Tensor  # LongTensor [N]
    teacher_ids: torch.Tensor  # LongTensor [N]
    normalized: bool

    @property
    def size(self) -> int:
        return int(self.student_ids.numel())


@dataclass(frozen=True)
class _Vocab:
    """What pairing reads from a tokenizer, read once (`get_vocab()` alone costs ~0.3 s on Qwen's 151k tokens)."""

    tokens: dict[str, int]
    added: dict[int, tuple[str, bool]]  # id -> (content, special)
    marker: str
    byte_fallback: bool
    name: str

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> "_Vocab":
        spec = tokenizer_spec(tokenizer)
        added = {i: (t.content, bool(t.special)) for i, t in tokenizer.added_tokens_decoder.items()}
        return cls(tokenizer.get_vocab(), added, spec.word_start_marker, spec.byte_fallback, tokenizer.name_or_path)

    def fingerprint(self) -> str:
        by_id = sorted(self.tokens.items(), key=lambda item: item[1])
        payload = [by_id, sorted(self.added.items()), self.marker, self.byte_fallback]
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[int, int]:
    """str.translate table: byte-level alphabet char -> its byte; Latin-1 chars outside the alphabet -> an
    unencodable code point, so that `.encode("latin-1")` fails on them as on any other foreign character."""
    table = {code: 0xFFFF for code in range(256)}
    table.update({ord(char): byte for byte, char in bytes_to_unicode().items()})
    return table


def _byte_level_bytes(token: str, byte_fallback: bool) -> bytes:
    try:
        return token.translate(_byte_level_table()).encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"token {token!r} has characters outside the byte-level BPE alphabet") from None


def _sentencepiece_bytes(token: str, byte_fallback: bool) -> bytes:
    match = _BYTE_FALLBACK.match(token) if byte_fallback else None
    if match:
        return bytes([int(match.group(1), 16)])
    return token.replace("▁", " ").encode("utf-8")


# How a tokenizer family writes text inside its token strings, keyed by its word-start marker (tokenizer_spec).
_TOKEN_TO_BYTES = {"Ġ": _byte_level_bytes, "▁": _sentencepiece_bytes}


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> dict[int, tuple[bytes, bool]]:
    """id -> (the bytes the token stands for, whether it is a byte-fallback token), for every token but the special
    ones. Non-special added tokens stand for their literal text."""
    vocab = _Vocab.of(tokenizer)
    to_bytes = _TOKEN_TO_BYTES.get(vocab.marker)
    if to_bytes is None:
        raise ModelSourceError(f"tokenizer {vocab.name!r}: no byte mapping for word-start marker {vocab.marker!r}; "
                               f"known markers: {sorted(_TOKEN_TO_BYTES)}")
    out: dict[int, tuple[bytes, bool]] = {}
    for token, token_id in vocab.tokens.items():
        added = vocab.added.get(token_id)
        if added is not None:
            if not added[1]:
                out[token_id] = (token.encode("utf-8"), False)
            continue
        out[token_id] = (to_bytes(token, vocab.byte_fallback),
                         vocab.byte_fallback and bool(_BYTE_FALLBACK.match(token)))
    return out


def _normalized_keys(vocab: _Vocab) -> dict[tuple[str, bytes], int]:
    """Normalized key -> chosen id (regular over byte-fallback, then lowest id)."""
    to_bytes = _TOKEN_TO_BYTES.get(vocab.marker)
    if to_bytes is None:
        raise ModelSourceError(
            f"tokenizer {vocab.name!r}: no byte mapping for word-start marker {vocab.marker!r}; "
            f"known markers: {sorted(_TOKEN_TO_BYTES)}"
        )
    ranked: dict[tuple[str, bytes], tuple[bool, int]] = {}
    for token, token_id in vocab.tokens.items():
        added = vocab.added.get(token_id)
        if added is not None:
            # Special tokens match only special tokens; other added tokens hold literal text (GPT-NeoX's space runs).
            key = ("special" if added[1] else "text", token.encode("utf-8"))
            rank = (False, token_id)
        else:
            key = ("text", to_bytes(token, vocab.byte_fallback))
            rank = (vocab.byte_fallback and bool(_BYTE_FALLBACK.match(token)), token_id)
        if key not in ranked or rank < ranked[key]:
            ranked[key] = rank
    return {key: rank[1] for key, rank in ranked.items()}


def _pairs(student_keys: dict, teacher_keys: dict, student_rows: int | None, teacher_rows: int | None):
    def usable(keys: dict, rows: int | None) -> dict:
        return keys if rows is None else {k: i for k, i in keys.items() if i < rows}

    student_keys = usable(student_keys, student_rows)
    teacher_keys = usable(teacher_keys, teacher_rows)
    pairs = sorted((student_keys[k], teacher_keys[k]) for k in student_keys.keys() & teacher_keys.keys())
    ids = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return ids[:, 0].contiguous(), ids[:, 1].contiguous()


def _check_rows(name: str, rows: int | None) -> None:
    if rows is not None and (not isinstance(rows, int) or rows <= 0):
        raise ValueError(f"{name} must be a positive embedding row count or None, got {rows!r}")


def shared_vocab(
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    normalize: bool = False,
    student_rows: int | None = None,
    teacher_rows: int | None = None,
    cache: bool = True,
) -> SharedVocab:
    """The (student id, teacher id) pairs of tokens the two tokenizers share (see the module docstring).

    student_rows / teacher_rows: each model's embedding row count; ids at or above it are dropped.
    cache: reuse / store the result in memory and under `cache_dir()/vocab/<hash>.safetensors`.
    """
    _check_rows("student_rows", student_rows)
    _check_rows("teacher_rows", teacher_rows)
    student, teacher = _Vocab.of(student_tokenizer), _Vocab.of(teacher_tokenizer)
    if not cache:
        return _build(student, teacher, normalize, student_rows, teacher_rows)
    key_payload = [_CACHE_FORMAT, student.fingerprint(), teacher.fingerprint(), normalize, student_rows, teacher_rows]
    key = hashlib.sha256(json.dumps(key_payload).encode("utf-8")).hexdigest()
    if key in _memory_cache:
        return _memory_cache[key]
    path = cache_dir() / "vocab" / f"{key}.safetensors"
    if path.is_file():
        tensors = load_file(str(path))
        result = SharedVocab(tensors["student_ids"], tensors["teacher_ids"], normalize)
    else:
        result = _build(student, teacher, normalize, student_rows, teacher_rows)
        _write_atomically(path, {"student_ids": result.student_ids, "teacher_ids": result.teacher_ids})
    _memory_cache[key] = result
    return result


def _build(student: _Vocab, teacher: _Vocab, normalize: bool, student_rows, teacher_rows) -> SharedVocab:
    if normalize:
        student_keys, teacher_keys = _normalized_keys(student), _normalized_keys(teacher)
    else:
        student_keys, teacher_keys = student.tokens, teacher.tokens
    student_ids, teacher_ids = _pairs(student_keys, teacher_keys, student_rows, teacher_rows)
    return SharedVocab(student_ids, teacher_ids, normalize)


def _write_atomically(path, tensors: dict[str, torch.Tensor]) -> None:
    # Several data-loader workers or processes may build the same vocabulary at once: write aside, then rename.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def overlap_report(student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase) -> dict:
    """Sizes of both vocabularies and of their exact and normalized overlaps."""
    exact = shared_vocab(student_tokenizer, teacher_tokenizer, normalize=False)
    normalized = shared_vocab(student_tokenizer, teacher_tokenizer, normalize=True)
    return {
        "student": student_tokenizer.name_or_path,
        "teacher": teacher_tokenizer.name_or_path,
        "student_vocab": len(student_tokenizer),
        "teacher_vocab": len(teacher_tokenizer),
        "exact": exact.size,
        "normalized": normalized.size,
    }
