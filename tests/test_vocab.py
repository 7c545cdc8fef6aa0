"""Shared vocabulary on the real tokenizers: exact and normalized pairs, row limits, determinism, caching."""

from __future__ import annotations

import pytest
import torch

from sra_distill.data import vocab
from sra_distill.data.tokenization import load_tokenizer
from sra_distill.data.vocab import SharedVocab, overlap_report, shared_vocab


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SRA_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(vocab, "_memory_cache", {})


def _check_aligned(shared: SharedVocab):
    assert shared.student_ids.dtype == torch.long and shared.teacher_ids.dtype == torch.long
    assert bool((shared.student_ids[1:] > shared.student_ids[:-1]).all())  # sorted, so no student id twice
    assert len(set(shared.teacher_ids.tolist())) == shared.size  # one-to-one


@pytest.mark.parametrize(
    "student,teacher,exact_range,normalized_range",
    [
        ("gpt2", "llama2", (6_000, 9_000), (16_000, 20_000)),  # measured: 7,263 exact, 18,207 normalized
        ("gpt2", "qwen1.5", (40_000, 45_000), (40_000, 45_000)),  # both byte-level: 42,257 either way
        ("smollm2", "gpt2", (35_000, 39_000), (35_000, 39_000)),  # 36,961 either way
    ],
)
def test_overlap_sizes_and_exact_pairs_match_strings(student, teacher, exact_range, normalized_range):
    tok_s, tok_t = load_tokenizer(student), load_tokenizer(teacher)
    exact = shared_vocab(tok_s, tok_t, cache=False)
    normalized = shared_vocab(tok_s, tok_t, normalize=True, cache=False)
    assert exact_range[0] <= exact.size <= exact_range[1]
    assert normalized_range[0] <= normalized.size <= normalized_range[1]
    assert normalized.size >= exact.size
    assert not exact.normalized and normalized.normalized
    for shared in (exact, normalized):
        _check_aligned(shared)
    assert tok_s.convert_ids_to_tokens(exact.student_ids.tolist()) == tok_t.convert_ids_to_tokens(exact.teacher_ids.tolist())


def test_normalized_gpt2_llama2_pairs_stand_for_the_same_text():
    gpt2, llama = load_tokenizer("gpt2"), load_tokenizer("llama2")
    shared = shared_vocab(gpt2, llama, normalize=True, cache=False)
    pairs = dict(zip(shared.student_ids.tolist(), shared.teacher_ids.tolist()))

    def pair_of(gpt2_token: str) -> str:
        return llama.convert_ids_to_tokens(pairs[gpt2.convert_tokens_to_ids(gpt2_token)])

    assert pair_of("Ġthe") == "▁the"
    assert pair_of("Ġ") == "▁"  # the regular space token, not the byte-fallback <0x20>
    assert pair_of("Ċ") == "<0x0A>"  # newline only exists as a byte-fallback token in Llama 2
    assert pair_of("Ã") == "<0xC3>"  # a UTF-8 lead byte on its own
    # Independent check through GPT-2's own decoder: every pair whose GPT-2 side is whole text reads the same.
    checked = 0
    for s_id, t_id in pairs.items():
        text = gpt2.decode([s_id])
        token = llama.convert_ids_to_tokens(t_id)
        if "\ufffd" in text or token.startswith("<0x") or s_id in gpt2.all_special_ids:
            continue
        assert text == token.replace("▁", " "), (s_id, t_id)
        checked += 1
    assert checked > 15_000


def test_special_tokens_pair_only_with_special_tokens():
    gpt2, qwen, llama = load_tokenizer("gpt2"), load_tokenizer("qwen1.5"), load_tokenizer("llama2")
    shared = shared_vocab(gpt2, qwen, normalize=True, cache=False)
    eos = gpt2.convert_tokens_to_ids("<|endoftext|>")
    assert shared.teacher_ids[shared.student_ids == eos].tolist() == [qwen.convert_tokens_to_ids("<|endoftext|>")]
    # Llama's <s> and </s> are special; GPT-2's literal text tokens "<", "s", ">" never pair with them.
    to_llama = shared_vocab(gpt2, llama, normalize=True, cache=False)
    assert not set(to_llama.teacher_ids.tolist()) & {0, 1, 2}


def test_rows_beyond_the_model_are_dropped():
    gpt2, qwen = load_tokenizer("gpt2"), load_tokenizer("qwen1.5")
    full = shared_vocab(gpt2, qwen, cache=False)
    # Qwen's embedding has padding rows past its tokenizer (151,936 > 151,646): nothing changes.
    assert torch.equal(shared_vocab(gpt2, qwen, teacher_rows=151_936, cache=False).teacher_ids, full.teacher_ids)
    cut = shared_vocab(gpt2, qwen, student_rows=30_000, teacher_rows=100_000, cache=False)
    keep = (full.student_ids < 30_000) & (full.teacher_ids < 100_000)
    assert torch.equal(cut.student_ids, full.student_ids[keep]) and torch.equal(cut.teacher_ids, full.teacher_ids[keep])
    with pytest.raises(ValueError, match="teacher_rows"):
        shared_vocab(gpt2, qwen, teacher_rows=0)


def test_deterministic_and_cached_on_disk_and_in_memory(tmp_path):
    gpt2, llama = load_tokenizer("gpt2"), load_tokenizer("llama2")
    first = shared_vocab(gpt2, llama, normalize=True)
    files = list((tmp_path / "vocab").glob("*.safetensors"))
    assert len(files) == 1
    assert shared_vocab(gpt2, llama, normalize=True) is first  # in-process cache
    vocab._memory_cache.clear()
    from_disk = shared_vocab(gpt2, llama, normalize=True)
    assert from_disk is not first and from_disk.normalized
    assert torch.equal(from_disk.student_ids, first.student_ids) and torch.equal(from_disk.teacher_ids, first.teacher_ids)
    fresh = shared_vocab(gpt2, llama, normalize=True, cache=False)
    assert torch.equal(fresh.student_ids, first.student_ids) and torch.equal(fresh.teacher_ids, first.teacher_ids)
    # Another mode or row limit is another entry.
    shared_vocab(gpt2, llama, normalize=False)
    shared_vocab(gpt2, llama, normalize=True, teacher_rows=1_000)
    assert len(list((tmp_path / "vocab").glob("*.safetensors"))) == 3


def test_overlap_report():
    report = overlap_report(load_tokenizer("gpt2"), load_tokenizer("mistral"))
    assert report["student"] == "gpt2" and report["teacher"] == "mistral"
    assert report["student_vocab"] == 50_257 and report["teacher_vocab"] == 32_000
    assert 6_000 <= report["exact"] < report["normalized"] <= 25_000  # measured: 8,020 and 21,240


def test_sentencepiece_pairs_collapse_byte_fallback_duplicates():
    llama, mistral = load_tokenizer("llama2"), load_tokenizer("mistral")
    exact = shared_vocab(llama, mistral, cache=False)
    normalized = shared_vocab(llama, mistral, normalize=True, cache=False)
    _check_aligned(normalized)
    # <0x41> and "A" stand for the same byte: normalized keeps one pair (the regular token), exact keeps both.
    a_id = llama.convert_tokens_to_ids("A")
    byte_id = llama.convert_tokens_to_ids("<0x41>")
    assert a_id in normalized.student_ids.tolist() and byte_id not in normalized.student_ids.tolist()
    assert {a_id, byte_id} <= set(exact.student_ids.tolist())
    assert 0 < exact.size - normalized.size < 256
