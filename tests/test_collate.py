"""Collation: padding, masks, labels from flags (pad == EOS), span ids, extras, DataLoader workers."""

from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sra_distill.data.batch import IGNORE_INDEX, PairedExample
from sra_distill.data.collate import PairedCollator, PairedDataset
from sra_distill.data.pairing import pair_example
from sra_distill.data.records import load_records
from sra_distill.data.spans import span_ids
from sra_distill.data.tokenization import load_tokenizer


def sequence_lengths(examples: list[PairedExample], which: str) -> torch.Tensor:
    return torch.tensor([len(getattr(e, which).input_ids) for e in examples])


def extras_with_offset(examples: list[PairedExample], offset: int) -> dict[str, torch.Tensor]:
    return {"student_response_len": torch.tensor([len(e.student.input_ids) - e.student.response_start + offset
                                                  for e in examples])}


@pytest.fixture(scope="module")
def tokenizers():
    return load_tokenizer("gpt2"), load_tokenizer("qwen1.5")  # both pad == EOS


@pytest.fixture(scope="module")
def dataset(tokenizers):
    records = load_records("dolly/train.jsonl", limit=12)
    return PairedDataset(records, *tokenizers, max_length=96, max_prompt_length=48)


def test_dataset_pairs_lazily_like_pair_example(dataset, tokenizers):
    assert len(dataset) == 12
    lazy, eager = dataset[3], pair_example(dataset.records[3], *tokenizers, 96, 48)
    assert lazy.response == eager.response
    for a, b in ((lazy.student, eager.student), (lazy.teacher, eager.teacher)):
        assert (a.input_ids, a.special, a.is_target, a.response_start) == (b.input_ids, b.special, b.is_target, b.response_start)
        np.testing.assert_array_equal(a.offsets, b.offsets)


def test_padding_masks_labels_and_starts(dataset, tokenizers):
    student_tok, teacher_tok = tokenizers
    examples = [dataset[i] for i in range(6)]
    batch = PairedCollator.for_tokenizers(student_tok, teacher_tok)(examples)
    assert batch.batch_size == 6
    for which, tok in (("student", student_tok), ("teacher", teacher_tok)):
        side = getattr(batch, which)
        lengths = sequence_lengths(examples, which)
        assert side.input_ids.shape == side.attention_mask.shape == side.labels.shape == side.span_ids.shape
        assert side.input_ids.shape == (6, int(lengths.max()))
        assert torch.equal(side.attention_mask.sum(1), lengths)
        assert torch.equal(side.response_start, torch.tensor([getattr(e, which).response_start for e in examples]))
        for b, example in enumerate(examples):
            ex = getattr(example, which)
            n = len(ex.input_ids)
            assert side.input_ids[b, :n].tolist() == ex.input_ids
            assert (side.input_ids[b, n:] == tok.pad_token_id).all()
            expected = [i if flag else IGNORE_INDEX for i, flag in zip(ex.input_ids, ex.is_target)]
            assert side.labels[b, :n].tolist() == expected
            assert (side.labels[b, n:] == IGNORE_INDEX).all()
            if ex.special[-1]:  # kept its EOS (not truncated): labelled although it is the pad id
                assert side.labels[b, n - 1] == tok.pad_token_id == tok.eos_token_id
        assert any(getattr(e, which).special[-1] for e in examples)


def test_span_ids_match_per_example_alignment(dataset, tokenizers):
    examples = [dataset[i] for i in range(8)]
    batch = PairedCollator.for_tokenizers(*tokenizers)(examples)
    for b, ex in enumerate(examples):
        s, t = ex.student, ex.teacher
        s_ids, t_ids, n = span_ids(s.offsets, t.offsets, s.response_start, t.response_start,
                                   student_special=s.special, teacher_special=t.special)
        assert batch.num_spans[b] == n > 0
        ls, lt = len(s.input_ids), len(t.input_ids)
        assert batch.student.span_ids[b, :ls].tolist() == s_ids.tolist()
        assert batch.teacher.span_ids[b, :lt].tolist() == t_ids.tolist()
        assert (batch.student.span_ids[b, ls:] == -1).all() and (batch.teacher.span_ids[b, lt:] == -1).all()
        # No span on the prompt, on specials or on padding; every span id is used on both sides, and span k ends
        # at the same response character on both sides.
        for side, ids in ((s, batch.student.span_ids[b]), (t, batch.teacher.span_ids[b])):
            assert (ids[: side.response_start] == -1).all()
            assert all(ids[i] == -1 for i, sp in enumerate(side.special) if sp)
            assert set(ids[ids >= 0].tolist()) == set(range(n))
        s_end = [max(s.offsets[i][1] for i in np.flatnonzero(s_ids == k)) for k in range(n)]
        t_end = [max(t.offsets[i][1] for i in np.flatnonzero(t_ids == k)) for k in range(n)]
        assert s_end == t_end == sorted(s_end)


def test_extras_fn_lands_in_batch_extras_and_collator_pickles(dataset, tokenizers):
    collate = PairedCollator.for_tokenizers(*tokenizers, extras_fn=functools.partial(extras_with_offset, offset=1))
    collate = pickle.loads(pickle.dumps(collate))
    examples = [dataset[0], dataset[1]]
    batch = collate(examples)
    expected = [len(e.student.input_ids) - e.student.response_start + 1 for e in examples]
    assert batch.extras["student_response_len"].tolist() == expected


def test_dataloader_with_workers(dataset, tokenizers):
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=PairedCollator.for_tokenizers(*tokenizers))
    batches = list(loader)
    assert [b.batch_size for b in batches] == [4, 4, 4]
    direct = PairedCollator.for_tokenizers(*tokenizers)([dataset[i] for i in range(4)])
    assert torch.equal(batches[0].student.labels, direct.student.labels)
    assert torch.equal(batches[0].teacher.span_ids, direct.teacher.span_ids)


def test_bad_inputs_are_named(dataset, tokenizers):
    collate = PairedCollator.for_tokenizers(*tokenizers)
    with pytest.raises(ValueError, match="empty list"):
        collate([])
    broken = pickle.loads(pickle.dumps(dataset[0]))
    broken.teacher.is_target.pop()
    with pytest.raises(ValueError, match="example 1, teacher: .* input_ids but {'is_target'"):
        collate([dataset[0], broken])
    with pytest.raises(ValueError, match="student_pad_id"):
        PairedCollator(None, 0)
    with pytest.raises(ValueError, match="max_prompt_length"):
        PairedDataset([], *tokenizers, max_length=8, max_prompt_length=8)
