"""Span alignment (`sra_distill.data.spans`): hand cases, real tokenizer pairs on Dolly and hard Unicode, hypothesis.

The strongest check decodes each span's tokens to raw bytes with the tokenizer's own vocabulary and compares them with
the text between consecutive common cuts: the offsets say which characters a span covers, the bytes say which
characters its tokens really carry, and both sides must agree.
"""

from __future__ import annotations

import doctest
import itertools
import json
import os
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.convert_slow_tokenizer import bytes_to_unicode

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sra_distill.data.batch import PairedExample, SideExample  # noqa: E402
from sra_distill.data.spans import align_spans, batch_span_ids, span_ids  # noqa: E402
from sra_distill.data.tokenization import load_tokenizer, tokenizer_spec  # noqa: E402
from sra_distill.paths import data_root  # noqa: E402

# The independent reference (a plain per-token loop) lives with the benchmark that uses it as its baseline.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_spans import reference_align  # noqa: E402

# Every tokenizer is student once and teacher once, byte-level against SentencePiece and against byte-level.
PAIRS = [
    ("gpt2", "llama2"),
    ("llama2", "qwen1.5"),
    ("qwen1.5", "gpt-neox"),
    ("gpt-neox", "smollm2"),
    ("smollm2", "mistral"),
    ("mistral", "gpt2"),
    ("gpt2", "qwen1.5"),
]
HARD_TEXTS = [
    "日本語のテキストと中文混合。",
    "Family: 👨‍👩‍👧 and flags 🇫🇷🇩🇪 then 👍🏽!",
    "مرحبا بالعالم، هذا نص عربي.",
    "Combining: e\u0301 a\u0300\u0323 n\u0303o Z̤̈ and café",
    "tabs\t\tand\nnewlines\n\n\nand    many   spaces  ",
    "  leading spaces, trailing tab\t",
    "Mixed 日本 words 😀😀 with ZWJ \u200d and NBSP\u00a0here",
    "Korean 한국어 텍스트, Thai ภาษาไทย, Hindi हिन्दी",
]


# ----------------------------------------------------------------------------------------------------------------
# Real tokenizers: encode prompt + response like the data pipeline (response offsets relative to the response).
# ----------------------------------------------------------------------------------------------------------------

_BYTE_OF_CHAR = {ch: b for b, ch in bytes_to_unicode().items()}


def token_bytes(tok, token_id: int) -> bytes:
    """The raw bytes a token stands for, from the vocabulary itself (not from offsets)."""
    piece = tok.convert_ids_to_tokens(token_id)
    if piece in tok.get_added_vocab():
        return piece.encode("utf-8")
    spec = tokenizer_spec(tok)
    if spec.word_start_marker == "▁":  # SentencePiece: ▁ is a space, <0xNN> a byte
        if spec.byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("▁", " ").encode("utf-8")
    return bytes(_BYTE_OF_CHAR[ch] for ch in piece)


def encode_side(name: str, prompt: str, response: str) -> SideExample:
    tok = load_tokenizer(name)
    p = tok(prompt, add_special_tokens=True)
    # split_special_tokens: a literal "<s>" or "<|endoftext|>" in the response is text, not a control token.
    r = tok(response, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
    ids = p["input_ids"] + r["input_ids"] + [tok.eos_token_id]
    # Prompt tokens carry (0, 0) and special=True, as the pipeline's SideExample does; EOS closes the sequence.
    offsets = [(0, 0)] * len(p["input_ids"]) + [tuple(o) for o in r["offset_mapping"]] + [(0, 0)]
    special = [True] * len(p["input_ids"]) + [False] * len(r["input_ids"]) + [True]
    labels = [not s for s in special[:-1]] + [True]
    return SideExample(ids, offsets, special, labels, response_start=len(p["input_ids"]))


def pair(student: str, teacher: str, prompt: str, response: str) -> PairedExample:
    return PairedExample(encode_side(student, prompt, response), encode_side(teacher, prompt, response), response)


def check_pair(example: PairedExample, student: str, teacher: str) -> list[tuple[int, int, int, int]]:
    """All invariants of one paired example; returns its spans.

    The byte check needs NFC text: Qwen and GPT-NeoX normalise to NFC, and their offsets then lose combining marks
    (" e\u0301" becomes one token " é" with offsets covering " e" only), which no aligner can see from offsets.
    """
    s, t, text = example.student, example.teacher, example.response
    spans = align_spans(
        s.offsets, t.offsets, s.response_start, t.response_start, student_special=s.special, teacher_special=t.special
    )
    s_ids, t_ids, n = span_ids(
        s.offsets, t.offsets, s.response_start, t.response_start, student_special=s.special, teacher_special=t.special
    )
    ref_spans, ref_s_ids, ref_t_ids = reference_align(
        s.offsets, t.offsets, s.response_start, t.response_start, s.special, t.special
    )
    assert spans == ref_spans
    assert s_ids.tolist() == ref_s_ids and t_ids.tolist() == ref_t_ids
    assert n == len(spans)
    assert s_ids.dtype == np.int64 and t_ids.dtype == np.int64

    cut_before = 0
    s_next, t_next = s.response_start, t.response_start
    for k, (sb, se, tb, te) in enumerate(spans):
        assert s_next == sb < se and t_next == tb < te  # contiguous, ordered, non-empty
        cut = s.offsets[se - 1][1]
        assert cut == t.offsets[te - 1][1] and cut > cut_before  # same right-most end, strictly increasing
        assert all(s.offsets[i][1] <= cut for i in range(sb, se)) and all(t.offsets[i][1] <= cut for i in range(tb, te))
        assert (s_ids[sb:se] == k).all() and (t_ids[tb:te] == k).all()
        for name, side, begin, end in ((student, s, sb, se), (teacher, t, tb, te)):
            tok = load_tokenizer(name)
            carried = b"".join(token_bytes(tok, side.input_ids[i]) for i in range(begin, end))
            if k == 0 and tokenizer_spec(tok).word_start_marker == "▁":
                assert carried.startswith(b" ")  # SentencePiece's dummy prefix on a separately encoded response
                carried = carried[1:]
            if text == unicodedata.normalize("NFC", text):
                assert carried == text[cut_before:cut].encode("utf-8"), (name, k, carried)
        cut_before, s_next, t_next = cut, se, te
    # Outside the spans: prompt, specials and whatever follows the last common cut.
    assert (s_ids[: s.response_start] == -1).all() and (s_ids[s_next:] == -1).all()
    assert (t_ids[: t.response_start] == -1).all() and (t_ids[t_next:] == -1).all()
    return spans


@pytest.fixture(scope="module")
def dolly_records():
    with open(data_root() / "dolly" / "valid.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in itertools.islice(f, 6)]


# ----------------------------------------------------------------------------------------------------------------
# Hand examples
# ----------------------------------------------------------------------------------------------------------------


def test_align_spans_as_a_library_user_calls_it():
    """Two tokenizers' offsets of one text, straight from the tokenizer call: the spans tile both token sequences
    and each span's tokens end at the same character on both sides."""
    text = "Distillation across tokenizers: unbelievable 日本語 results!"
    student, teacher = load_tokenizer("gpt2"), load_tokenizer("llama2")
    s = student(text, return_offsets_mapping=True)
    t = teacher(text, return_offsets_mapping=True)
    spans = align_spans(s["offset_mapping"], t["offset_mapping"])
    assert len(spans) > 5
    s_off, t_off = s["offset_mapping"], t["offset_mapping"]
    assert spans[0][0] == 0 and spans[0][2] == 1  # llama's BOS (offsets (0, 0)) is in no span
    for (s_begin, s_end, t_begin, t_end), following in zip(spans, spans[1:] + [None]):
        assert s_begin < s_end and t_begin < t_end
        assert s_off[s_end - 1][1] == t_off[t_end - 1][1]
        if following is not None:
            assert (following[0], following[2]) == (s_end, t_end)
    assert s_off[spans[-1][1] - 1][1] == len(text)


def test_align_spans_docstring_example_holds():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for test in finder.find(align_spans, "align_spans", globs={"align_spans": align_spans}):
        runner.run(test)
    assert runner.summarize(verbose=False) == doctest.TestResults(failed=0, attempted=1)


def test_gpt2_byte_tokens_of_one_character():
    # " 日" then "x": GPT-2 splits 日 into byte tokens that share its offsets; the other side has one token.
    gpt2 = [(60, 66), (66, 68), (67, 68), (67, 68), (68, 69)]
    other = [(60, 66), (66, 68), (68, 69)]
    assert align_spans(gpt2, other) == [(0, 1, 0, 1), (1, 4, 1, 2), (4, 5, 2, 3)]
    s_ids, t_ids, n = span_ids(gpt2, other)
    assert s_ids.tolist() == [0, 1, 1, 1, 2] and t_ids.tolist() == [0, 1, 2] and n == 3


def test_neox_empty_whitespace_tokens_and_trimmed_spaces():
    # "Hello 日本語 world": GPT-NeoX trims the spaces and emits an empty "Ġ" at (6, 6).
    neox = [(0, 5), (6, 6), (6, 8), (8, 9), (8, 9), (10, 15)]
    gpt2 = [(0, 5), (5, 7), (6, 7), (6, 7), (7, 8), (7, 8), (8, 9), (8, 9), (9, 15)]
    assert align_spans(neox, gpt2) == [(0, 1, 0, 1), (1, 3, 1, 6), (3, 5, 6, 8), (5, 6, 8, 9)]


def test_bos_on_one_side_only():
    llama = [(0, 0), (0, 5), (5, 6), (6, 11)]  # <s> ▁Hello ▁ world
    gpt2 = [(0, 5), (5, 11)]
    assert align_spans(llama, gpt2) == [(1, 2, 0, 1), (2, 4, 1, 2)]
    s_ids, _, _ = span_ids(llama, gpt2)
    assert s_ids[0] == -1


def test_truncation_at_different_characters():
    student = [(0, 3), (3, 7), (7, 12), (12, 20)]
    teacher = [(0, 3), (3, 5), (5, 7), (7, 9)]  # stops inside the third student token
    assert align_spans(student, teacher) == [(0, 1, 0, 1), (1, 2, 1, 3)]
    s_ids, t_ids, n = span_ids(student, teacher)
    assert s_ids.tolist() == [0, 1, -1, -1] and t_ids.tolist() == [0, 1, 1, -1] and n == 2


def test_prompt_tokens_are_ignored_whatever_their_offsets():
    # Prompt offsets into another string may be anything: they must neither cut nor block cuts.
    student = [(0, 9), (5, 40), (0, 4), (4, 8)]
    teacher = [(0, 2), (0, 4), (4, 6), (6, 8)]
    assert align_spans(student, teacher, 2, 1) == [(2, 3, 1, 2), (3, 4, 2, 4)]
    assert align_spans(student, teacher, 4, 4) == []


def test_byte_token_reaching_back_before_a_cut_vetoes_it():
    # GPT-2 merges the last byte of char 2 with the first of char 3: (2, 3), (2, 3), (2, 4). End offsets alone
    # would cut at 3 and give a span holding two of the three bytes of char 2.
    gpt2 = [(0, 2), (2, 3), (2, 3), (2, 4), (3, 4)]
    per_char = [(0, 2), (2, 3), (3, 4)]
    assert align_spans(gpt2, per_char) == [(0, 1, 0, 1), (1, 5, 1, 3)]
    # SentencePiece dummy prefix: "▁" (0, 1) then "▁a" (0, 2) is no cut at 1.
    assert align_spans([(0, 1), (0, 2)], [(0, 1), (1, 2)]) == [(0, 2, 0, 2)]


def test_token_ending_before_an_earlier_one_is_no_cut():
    # (2, 3) ends before (0, 5) does: cutting at 3 would leave characters 3-5 of token 0 in span 0.
    assert align_spans([(0, 5), (2, 3), (5, 7)], [(0, 3), (3, 5), (5, 7)]) == [(0, 3, 0, 3)]


def test_explicit_special_flags_override_the_zero_offset_heuristic():
    # Offsets relative to the response: a real empty token can sit at (0, 0) (NeoX "Ġ" before a trimmed word).
    neox = [(0, 0), (0, 0), (1, 5)]  # prompt-side special, real empty token, "word"
    gpt2 = [(0, 5)]
    assert align_spans(neox, gpt2) == [(2, 3, 0, 1)]  # heuristic: both (0, 0) tokens are special
    assert align_spans(neox, gpt2, student_special=[True, False, False]) == [(1, 3, 0, 1)]
    # A special token inside a span (a chat marker mid-response) belongs to no span.
    s_ids, _, _ = span_ids([(0, 2), (0, 0), (2, 4)], [(0, 4)], student_special=[False, True, False])
    assert s_ids.tolist() == [0, -1, 0]


def test_no_common_cut_and_empty_inputs():
    assert align_spans([(0, 3)], [(0, 2)]) == []
    s_ids, t_ids, n = span_ids([], [(0, 2)])
    assert s_ids.shape == (0,) and t_ids.tolist() == [-1] and n == 0
    s_ids, t_ids, n = batch_span_ids([], 4, 4)
    assert s_ids.shape == (0, 4) and n.shape == (0,)


def test_arrays_and_tensors_are_accepted():
    off = np.array([[0, 2], [2, 4]])
    assert align_spans(off, torch.tensor([[0, 4]])) == align_spans([(0, 2), (2, 4)], [(0, 4)]) == [(0, 2, 0, 1)]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: align_spans([(0, 1, 2)], [(0, 1)]), "student_offsets"),
        (lambda: align_spans([(0, 1)], [(-1, 1)]), "teacher_offsets"),
        (lambda: align_spans([(0, 1)], [(0, 1)], student_start=3), "student_start=3"),
        (lambda: align_spans([(0, 1)], [(0, 1)], teacher_special=[True, False]), "teacher_special"),
        (lambda: batch_span_ids([([(0, 1), (1, 2)], [(0, 2)])], 1, 4), "student_length=1"),
        (lambda: batch_span_ids([42], 4, 4), "batch item 0"),
    ],
)
def test_bad_input_names_the_problem(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


# ----------------------------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------------------------


def test_batch_span_ids_matches_single_sequences_and_pads():
    items = [
        ([(0, 0), (0, 5), (5, 6), (6, 11)], [(0, 5), (5, 11)]),
        ([(0, 2), (2, 4)], [(0, 0), (0, 1), (1, 4)], 0, 1),
        ([(0, 3), (3, 7), (7, 12)], [(0, 3), (3, 5), (5, 7), (7, 9)], 0, 0, [False] * 3, [False] * 4),
    ]
    singles = [
        span_ids(*items[0]),
        span_ids(*items[1]),
        span_ids(*items[2][:4], student_special=items[2][4], teacher_special=items[2][5]),
    ]
    s_ids, t_ids, n = batch_span_ids(items, student_length=6, teacher_length=5)
    assert s_ids.dtype == t_ids.dtype == n.dtype == torch.int64
    assert s_ids.shape == (3, 6) and t_ids.shape == (3, 5) and n.shape == (3,)
    for b, (one_s, one_t, one_n) in enumerate(singles):
        assert s_ids[b, : len(one_s)].tolist() == one_s.tolist() and (s_ids[b, len(one_s) :] == -1).all()
        assert t_ids[b, : len(one_t)].tolist() == one_t.tolist() and (t_ids[b, len(one_t) :] == -1).all()
        assert n[b] == one_n


# ----------------------------------------------------------------------------------------------------------------
# Real tokenizers
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("student, teacher", PAIRS)
def test_real_tokenizer_pairs_on_dolly(student, teacher, dolly_records):
    examples = [pair(student, teacher, r["prompt"], r["output"]) for r in dolly_records]
    for ex in examples:
        spans = check_pair(ex, student, teacher)
        # English prose: nearly every word is a span; the last one ends at the response's last word.
        assert len(spans) >= 0.5 * (len(ex.student.input_ids) - ex.student.response_start - 1)
    # The batch path gives the same ids as the single-sequence path.
    s_len = max(len(ex.student.input_ids) for ex in examples)
    t_len = max(len(ex.teacher.input_ids) for ex in examples)
    s_ids, t_ids, n = batch_span_ids(examples, s_len, t_len)
    for b, ex in enumerate(examples):
        s, t = ex.student, ex.teacher
        one_s, one_t, one_n = span_ids(
            s.offsets, t.offsets, s.response_start, t.response_start,
            student_special=s.special, teacher_special=t.special,
        )
        assert s_ids[b, : len(one_s)].tolist() == one_s.tolist() and t_ids[b, : len(one_t)].tolist() == one_t.tolist()
        assert n[b] == one_n


@pytest.mark.parametrize("student, teacher", PAIRS)
def test_real_tokenizer_pairs_on_hard_unicode(student, teacher):
    for text in HARD_TEXTS:
        for form in (text, unicodedata.normalize("NFC", text)):  # raw: offsets only; NFC: also the bytes
            check_pair(pair(student, teacher, "### Response:\n", form), student, teacher)


def test_real_truncation_stops_spans_at_the_last_common_cut(dolly_records):
    ex = pair("gpt2", "llama2", dolly_records[0]["prompt"], dolly_records[0]["output"])
    s, t = ex.student, ex.teacher
    cut_s, cut_t = s.response_start + 17, t.response_start + 9  # truncate each side at a different token
    short = PairedExample(
        SideExample(s.input_ids[:cut_s], s.offsets[:cut_s], s.special[:cut_s], s.is_target[:cut_s], s.response_start),
        SideExample(t.input_ids[:cut_t], t.offsets[:cut_t], t.special[:cut_t], t.is_target[:cut_t], t.response_start),
        ex.response,
    )
    spans = check_pair(short, "gpt2", "llama2")
    last_char = min(s.offsets[cut_s - 1][1], t.offsets[cut_t - 1][1])
    assert spans and s.offsets[spans[-1][1] - 1][1] <= last_char


# ----------------------------------------------------------------------------------------------------------------
# Hypothesis
# ----------------------------------------------------------------------------------------------------------------

_HARD_CHARS = st.sampled_from(
    list(" \t\n  aé日本語한ภمر")
    + ["\u0301", "\u200d", "👨", "👩", "👧", "🇫", "🇷", "😀", "\u00a0"]
)
# No unassigned, private-use or control code points (tabs and newlines come from _HARD_CHARS): SmolLM2's vocabulary
# lacks the bytes 0xF1, 0xF2 (planes 4-11) and some C0 controls, and silently drops them, so its tokens would not
# carry the text their offsets claim. No literal "▁" either: SentencePiece stores spaces as "▁", so token_bytes
# cannot tell them apart.
_TEXT = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8", exclude_categories=("Cs", "Co", "Cn", "Cc"), exclude_characters="▁"), _HARD_CHARS
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(text=_TEXT, prompt=st.sampled_from(["", "Q: hi\n", "### Response:\n"]), which=st.sampled_from(PAIRS))
def test_hypothesis_texts_on_real_tokenizers(text, prompt, which):
    check_pair(pair(*which, prompt, text), *which)
    check_pair(pair(*which, prompt, unicodedata.normalize("NFC", text)), *which)


_OFFSETS = st.lists(st.tuples(st.integers(0, 12), st.integers(0, 6)).map(lambda p: (p[0], p[0] + p[1])), max_size=14)


@settings(max_examples=300, deadline=None)
@given(
    s_off=_OFFSETS,
    t_off=_OFFSETS,
    starts=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    data=st.data(),
)
def test_hypothesis_arbitrary_offsets_match_the_reference_loop(s_off, t_off, starts, data):
    s_start, t_start = min(starts[0], len(s_off)), min(starts[1], len(t_off))
    s_special = data.draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=len(s_off), max_size=len(s_off))))
    t_special = data.draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=len(t_off), max_size=len(t_off))))
    spans = align_spans(s_off, t_off, s_start, t_start, student_special=s_special, teacher_special=t_special)
    s_ids, t_ids, n = span_ids(s_off, t_off, s_start, t_start, student_special=s_special, teacher_special=t_special)
    ref_spans, ref_s, ref_t = reference_align(s_off, t_off, s_start, t_start, s_special, t_special)
    assert spans == ref_spans and s_ids.tolist() == ref_s and t_ids.tolist() == ref_t and n == len(spans)
    b_s, b_t, b_n = batch_span_ids(
        [(s_off, t_off, s_start, t_start, s_special, t_special)] * 2, len(s_off) + 1, len(t_off) + 2
    )
    assert b_s[1, : len(s_off)].tolist() == ref_s and b_t[0, : len(t_off)].tolist() == ref_t and b_n.tolist() == [n, n]
