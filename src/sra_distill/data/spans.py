"""Tokenizer-agnostic spans: the finest segmentation of a response that two tokenizations share.

Definition (SRA, Dao et al., ACL 2026, section 3.1; `../shared/docs/sra-method.md` section 1). Both tokenizers
encode the same string with character offsets `(start_i, end_i)`. Only response tokens count (index >= `*_start`);
special tokens count nowhere. Over the remaining tokens of one side, token i *cuts* that side at character `c = end_i` when

    end_i >= end_j   for every earlier token j     (nothing before it reaches past c)
    end_i <  end_j   for every later token j       (the spec's rule: every later token ends after c)
    c     <= start_j for every later token j       (no later token reaches back before c)

The common cuts `c_0 < c_1 < ... < c_{K-1}` are the cut positions of both sides; span k is the tokens after the
cut at `c_{k-1}` up to and including the one that cuts at `c_k`, i.e. the text `text[c_{k-1}:c_k]` on both sides
(the longest common subsequence of the two end-offset sequences). Tokens after the last common cut are in no span.

Only end offsets are compared ACROSS sides, because start offsets disagree there (byte-level BPE keeps the leading
space inside "Ġword", GPT-NeoX trims it from the offsets, SentencePiece has "▁word"). The first and last conditions
are within one side and only veto cuts the end rule alone would accept wrongly: byte-level BPEs (GPT-2, Qwen)
sometimes merge the last byte of one character with the first byte of the next (offsets (2,3),(2,3),(2,4)), and
SentencePiece's dummy prefix gives "▁" (0,1) then "▁a" (0,2); a cut at 3 or 1 there would split a token's bytes.

Everything runs over the whole batch at once with numpy, on the flat list of kept tokens: a cumulative maximum and a
reverse cumulative minimum per side, a lookup table of one side's cut positions for the other, a cumulative sum.
`align_spans` and `span_ids` are the one-sequence views of the same kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from operator import itemgetter
from typing import Any, NamedTuple

import numpy as np
import torch

from sra_distill.data.batch import PairedExample


def _response_offsets(parts: list, total: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Starts and ends [total] of the concatenated parts: lists of (char_start, char_end) pairs or [N, 2] arrays."""
    if all(isinstance(part, (list, tuple)) for part in parts):
        # The pipeline's lists of tuples: itemgetter + np.fromiter over the whole batch, ~40 ns a token (np.asarray
        # on pairs costs ~270 ns, and unzipping with zip(*pairs) allocates an iterator per token).
        try:
            return tuple(
                np.fromiter(map(itemgetter(i), chain.from_iterable(parts)), dtype=np.int64, count=total) for i in (0, 1)
            )
        except (IndexError, TypeError, ValueError) as err:
            raise ValueError(f"{name}: expected (char_start, char_end) integer pairs ({err})") from None
    arrays = [np.asarray(part, dtype=np.int64).reshape(-1, 2) for part in parts]
    flat = np.concatenate(arrays) if arrays else np.zeros((0, 2), dtype=np.int64)
    return flat[:, 0], flat[:, 1]


class _Side(NamedTuple):
    """One side of a batch, reduced to the tokens that take part (response, not special), in row-major order."""

    kept: np.ndarray  # [B, length] bool: where those tokens sit in the padded batch
    rows: np.ndarray  # [N] sample index of each kept token
    starts: np.ndarray  # [N] character offsets
    ends: np.ndarray  # [N]


def _flag_bytes(flags: Any) -> bytes:
    """Special flags as one byte each; bytes() reads a list of bools ~3x faster than numpy does."""
    if isinstance(flags, list):
        try:
            return bytes(flags)
        except (TypeError, ValueError):  # not plain bools/ints in 0..255
            pass
    return np.asarray(flags, dtype=bool).tobytes()


def _pack_side(samples: Sequence[tuple[Any, Any, Any]], length: int, side: str) -> _Side:
    """(offsets, start, special) per sample -> the kept tokens of a right-padded [B, length] batch.
    Only response tokens are read: the prompt's offsets never matter."""
    batch = len(samples)
    counts, starts_at, parts, flags = np.zeros(batch, np.int64), np.zeros(batch, np.int64), [], []
    has_flags = np.zeros(batch, dtype=bool)
    for b, (offsets, start, special) in enumerate(samples):
        item = f"batch item {b}: " if batch > 1 else ""
        n = len(offsets)
        arraylike = isinstance(offsets, (np.ndarray, torch.Tensor))
        shape = tuple(offsets.shape) if arraylike else (n, *np.shape(offsets[0])) if n else (0, 2)
        if n and shape[1:] != (2,):
            raise ValueError(f"{item}{side}_offsets: expected (char_start, char_end) pairs [T, 2], got shape {shape}")
        if n > length:
            raise ValueError(f"{item}{n} {side} tokens do not fit {side}_length={length}")
        start = int(start)
        if not 0 <= start <= n:
            raise ValueError(f"{item}{side}_start={start} is outside the sequence of {n} tokens")
        if special is not None:
            if len(special) != n:
                raise ValueError(f"{item}{side}_special: {len(special)} special flags for {n} tokens")
            has_flags[b] = True
        counts[b], starts_at[b] = n - start, start
        parts.append(offsets[start:])
        flags.append(bytes(n - start) if special is None else _flag_bytes(special[start:]))
    total = int(counts.sum())
    starts, ends = _response_offsets(parts, total, f"{side}_offsets")
    rows = np.repeat(np.arange(batch), counts)
    if total and min(starts.min(), ends.min()) < 0:
        bad = int(rows[np.minimum(starts, ends) < 0][0])
        raise ValueError(f"{'batch item %d: ' % bad if batch > 1 else ''}{side}_offsets: offsets must be >= 0")
    # Default special-token test of the fast tokenizers: offsets exactly (0, 0); explicit flags override it.
    flat_flags = np.frombuffer(b"".join(flags), dtype=np.uint8) != 0
    keep = ~np.where(np.repeat(has_flags, counts), flat_flags, (starts == 0) & (ends == 0))
    # Boolean-mask assignment fills row-major, i.e. in the order the responses were concatenated.
    column = np.arange(length)
    response = (column >= starts_at[:, None]) & (column < (starts_at + counts)[:, None])
    kept = np.zeros((batch, length), dtype=bool)
    kept[response] = keep
    return _Side(kept, rows[keep], starts[keep], ends[keep])


def _cut_keys(side: _Side, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Which kept tokens cut their side (see module docstring), and each token's key `row * stride + end`.

    Shifting every sample by `row * stride` (stride > any offset) lets single flat cumulative max/min run over the
    whole batch: a sample's keys all exceed the previous sample's, so no sample sees another's tokens."""
    shift = side.rows * stride
    end_key = shift + side.ends
    reach_so_far = np.maximum.accumulate(end_key)
    # "Every later token starts at or after c and ends after c" in one reverse minimum: for integers,
    # min(2 * start, 2 * end - 1) >= 2c holds exactly when start >= c and end > c.
    later = np.minimum(2 * (shift + side.starts), 2 * end_key - 1)
    later_min = np.minimum.accumulate(later[::-1])[::-1]
    cut = end_key >= reach_so_far
    cut[:-1] &= later_min[1:] >= 2 * end_key[:-1]
    return cut, end_key


def _batched_span_ids(student: _Side, teacher: _Side) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Span ids [B, Ts], [B, Tt] (-1 outside spans) and span counts [B]."""
    batch = student.kept.shape[0]
    stride = int(max(student.ends.max(initial=0), teacher.ends.max(initial=0))) + 1
    s_cut, s_key = _cut_keys(student, stride)
    t_cut, t_key = _cut_keys(teacher, stride)
    # Common cuts: a lookup table over the key space (batch x characters: about the size of the text itself) is
    # several times faster than a sorted-set intersection (np.intersect1d) or a binary search.
    s_cut_keys, t_cut_keys = s_key[s_cut], t_key[t_cut]
    is_teacher_cut = np.zeros(batch * stride, dtype=bool)
    is_teacher_cut[t_cut_keys] = True
    is_student_cut = np.zeros(batch * stride, dtype=bool)
    is_student_cut[s_cut_keys] = True
    s_common, t_common = is_teacher_cut[s_cut_keys], is_student_cut[t_cut_keys]
    n_spans = np.bincount(s_cut_keys[s_common] // stride, minlength=batch).astype(np.int64)
    spans_before_sample = np.cumsum(n_spans) - n_spans

    def ids_for(side: _Side, cut: np.ndarray, common: np.ndarray) -> np.ndarray:
        common_cut = np.zeros(len(side.ends), dtype=np.int64)
        common_cut[cut] = common
        # A token's span id = number of common-cut tokens before it in its sample.
        ids = np.cumsum(common_cut) - common_cut - spans_before_sample[side.rows]
        ids[ids >= n_spans[side.rows]] = -1  # after the sample's last common cut
        padded = np.full(side.kept.shape, -1, dtype=np.int64)
        padded[side.kept] = ids
        return padded

    return ids_for(student, s_cut, s_common), ids_for(teacher, t_cut, t_common), n_spans


def span_ids(student_offsets, teacher_offsets, student_start: int = 0, teacher_start: int = 0, *,
             student_special=None, teacher_special=None) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-token span ids (int64, -1 outside spans) of the student and the teacher, and the number of spans.

    Offsets: [T, 2] `(char_start, char_end)` pairs over the same string (lists of tuples, arrays or tensors).
    Tokens before `*_start` (the prompt) and special tokens (flags `*_special`, default: offsets exactly (0, 0))
    get -1.
    """
    return _one_sequence((student_offsets, teacher_offsets, student_start, teacher_start, student_special,
                          teacher_special))


def example_span_ids(example: PairedExample) -> tuple[np.ndarray, np.ndarray, int]:
    """`span_ids` of a paired example (its prompts and special tokens outside spans)."""
    return _one_sequence(example)


def _one_sequence(item: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """`batch_span_ids` of one sample (a PairedExample or the tuple of `_span_input`), unpadded, as numpy."""
    inputs = _span_input(item, 0)
    s_ids, t_ids, n = batch_span_ids([inputs], len(inputs[0]), len(inputs[1]))
    return s_ids[0].numpy(), t_ids[0].numpy(), int(n[0])


def align_spans(student_offsets, teacher_offsets, student_start: int = 0, teacher_start: int = 0, *,
                student_special=None, teacher_special=None) -> list[tuple[int, int, int, int]]:
    """The spans two tokenizations of one text share, as token ranges `(s_begin, s_end, t_begin, t_end)`, ends
    exclusive: student tokens `s_begin..s_end-1` and teacher tokens `t_begin..t_end-1` cover the same characters.

    Offsets: [T, 2] `(char_start, char_end)` pairs over the same string, as a tokenizer returns them with
    `return_offsets_mapping=True` (lists of tuples, arrays or tensors). Tokens before `*_start` (a prompt) and
    special tokens (flags `*_special`, default: offsets exactly (0, 0), like BOS) are in no span.

    Spans are ordered, non-empty on both sides, and span k covers the characters `(c_{k-1}, c_k]` between two
    common cuts (its last token on each side ends at `c_k`); tokens after the last common cut are in no span.
    Special tokens strictly inside a range (a chat marker mid-response) are in no span either: `span_ids` gives
    them -1. `span_ids` / `batch_span_ids` give the same spans as per-token ids, for training.

    Example: "unbelievable" cut "un|bel|iev|able" by the student and "unbel|ievable" by the teacher shares two
    spans, "unbel" (student tokens 0-1, teacher token 0) and "ievable" (student tokens 2-3, teacher token 1):

    >>> align_spans([(0, 2), (2, 5), (5, 8), (8, 12)], [(0, 5), (5, 12)])
    [(0, 2, 0, 1), (2, 4, 1, 2)]

    With real tokenizers (what `sra spans` shows):

    >>> s = student_tokenizer(text, return_offsets_mapping=True)  # doctest: +SKIP
    >>> t = teacher_tokenizer(text, return_offsets_mapping=True)  # doctest: +SKIP
    >>> align_spans(s["offset_mapping"], t["offset_mapping"])  # doctest: +SKIP
    """
    s_ids, t_ids, n_spans = span_ids(
        student_offsets,
        teacher_offsets,
        student_start,
        teacher_start,
        student_special=student_special,
        teacher_special=teacher_special,
    )

    def bounds(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """First token of each span and one past its last (cutting) token."""
        inside = np.flatnonzero(ids >= 0)
        labels = ids[inside]
        first = inside[np.searchsorted(labels, np.arange(n_spans), side="left")]
        last = inside[np.searchsorted(labels, np.arange(n_spans), side="right") - 1]
        return first, last + 1

    s_begin, s_end = bounds(s_ids)
    t_begin, t_end = bounds(t_ids)
    return list(zip(s_begin.tolist(), s_end.tolist(), t_begin.tolist(), t_end.tolist()))


def _span_input(item: Any, index: int) -> tuple:
    """One sample as (student_offsets, teacher_offsets, student_start, teacher_start, student_special,
    teacher_special), from a PairedExample or such a tuple (starts and specials optional)."""
    if isinstance(item, PairedExample):
        item = (item.student.offsets, item.teacher.offsets, item.student.response_start,
                item.teacher.response_start, item.student.special, item.teacher.special)
    if isinstance(item, Sequence) and 2 <= len(item) <= 6:
        return tuple(item) + (0, 0, None, None)[len(item) - 2 :]
    raise TypeError(
        f"batch item {index}: expected a PairedExample or a tuple "
        f"(student_offsets, teacher_offsets[, student_start, teacher_start[, student_special, teacher_special]]), "
        f"got {type(item).__name__}"
    )


def batch_span_ids(
    items: Sequence[Any], student_length: int, teacher_length: int
) -> tuple[torch.LongTensor, torch.LongTensor, torch.LongTensor]:
    """Span ids for a batch: `[B, student_length]`, `[B, teacher_length]` (right-padded with -1) and `[B]` counts.

    Each item is a `PairedExample` or a tuple of its six inputs (`_span_input`). Meant for data-loader workers: one numpy pass over the whole padded batch.
    """
    inputs = [_span_input(item, i) for i, item in enumerate(items)]
    s_ids, t_ids, n = _batched_span_ids(
        _pack_side([(x[0], x[2], x[4]) for x in inputs], student_length, "student"),
        _pack_side([(x[1], x[3], x[5]) for x in inputs], teacher_length, "teacher"),
    )
    return torch.from_numpy(s_ids), torch.from_numpy(t_ids), torch.from_numpy(n)
