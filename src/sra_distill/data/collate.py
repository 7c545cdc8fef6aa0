"""From records to `PairedBatch`es: a lazily-pairing dataset and a collator, both meant for data-loader workers.

`PairedDataset[i]` pairs record i (tokenizes it for both models, `pairing.pair_example`) when asked, so the work runs
in the workers. `PairedCollator` right-pads each side to its longest sequence and builds

    input_ids       [B, T]  token ids, pad id after the sequence
    attention_mask  [B, T]  1 on tokens, 0 on padding
    labels          [B, T]  the token id where the example's `is_target` flag is set (response + EOS), IGNORE_INDEX
                            elsewhere (prompt, padding) -- from the flags, never from pad ids, since pad == EOS
                            for GPT-2 and Qwen
    span_ids        [B, T]  `spans.batch_span_ids` (-1 outside spans), num_spans [B]
    response_start  [B]

plus `extras_fn(examples)` (a method's own per-batch tensors, e.g. token alignments) in `PairedBatch.extras`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from sra_distill.data.batch import IGNORE_INDEX, PairedBatch, PairedExample, SideBatch, SideExample
from sra_distill.data.pairing import check_lengths, pair_example
from sra_distill.data.records import Record
from sra_distill.data.spans import batch_span_ids

ExtrasFn = Callable[[list[PairedExample]], dict[str, torch.Tensor]]


def _check_side(side: SideExample, index: int, name: str) -> None:
    n = len(side.input_ids)
    lengths = {"offsets": len(side.offsets), "special": len(side.special), "is_target": len(side.is_target)}
    wrong = {k: v for k, v in lengths.items() if v != n}
    if wrong:
        raise ValueError(f"example {index}, {name}: {n} input_ids but {wrong}")
    if not 0 <= side.response_start <= n:
        raise ValueError(f"example {index}, {name}: response_start={side.response_start} outside 0..{n}")


def _pad_side(sides: list[SideExample], pad_id: int) -> tuple[torch.Tensor, ...]:
    """input_ids, attention_mask, labels [B, T] and response_start [B] of one side."""
    length = max(len(s.input_ids) for s in sides)
    input_ids = torch.full((len(sides), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sides), length), dtype=torch.long)
    labels = torch.full((len(sides), length), IGNORE_INDEX, dtype=torch.long)
    for b, side in enumerate(sides):
        ids = torch.tensor(side.input_ids, dtype=torch.long)
        n = ids.shape[0]
        input_ids[b, :n] = ids
        attention_mask[b, :n] = 1
        labels[b, :n] = torch.where(torch.tensor(side.is_target, dtype=torch.bool), ids, IGNORE_INDEX)
    response_start = torch.tensor([s.response_start for s in sides], dtype=torch.long)
    return input_ids, attention_mask, labels, response_start


class PairedCollator:
    """`collate_fn` for a DataLoader over `PairedExample`s; picklable as long as `extras_fn` is (a module-level
    function, a staticmethod or a `functools.partial` of one)."""

    def __init__(self, student_pad_id: int, teacher_pad_id: int | None, extras_fn: ExtrasFn | None = None):
        """teacher_pad_id None: the examples have no teacher side (a method that reads the student alone)."""
        for name, pad in (("student_pad_id", student_pad_id), ("teacher_pad_id", teacher_pad_id)):
            if name == "teacher_pad_id" and pad is None:
                continue
            if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
                raise ValueError(f"{name} must be a non-negative token id, got {pad!r}")
        self.student_pad_id = student_pad_id
        self.teacher_pad_id = teacher_pad_id
        self.extras_fn = extras_fn

    @classmethod
    def for_tokenizers(
        cls,
        student_tokenizer: PreTrainedTokenizerBase,
        teacher_tokenizer: PreTrainedTokenizerBase | None,
        extras_fn: ExtrasFn | None = None,
    ) -> "PairedCollator":
        """A collator padding with each tokenizer's pad id (loaded tokenizers have one: EOS where none is set)."""
        return cls(student_tokenizer.pad_token_id, None if teacher_tokenizer is None else teacher_tokenizer.pad_token_id,
                   extras_fn)

    def __call__(self, examples: Sequence[PairedExample]) -> PairedBatch:
        examples = list(examples)
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        one_side = self.teacher_pad_id is None
        for i, example in enumerate(examples):
            _check_side(example.student, i, "student")
            if not one_side:
                _check_side(example.teacher, i, "teacher")
        s_ids, s_mask, s_labels, s_start = _pad_side([e.student for e in examples], self.student_pad_id)
        extras = self.extras_fn(examples) if self.extras_fn is not None else {}
        if one_side:  # no teacher tokenization, so no spans
            no_spans = torch.full_like(s_ids, -1)
            return PairedBatch(SideBatch(s_ids, s_mask, s_labels, no_spans, s_start), None,
                               torch.zeros(len(examples), dtype=torch.long), extras)
        t_ids, t_mask, t_labels, t_start = _pad_side([e.teacher for e in examples], self.teacher_pad_id)
        s_spans, t_spans, num_spans = batch_span_ids(examples, s_ids.shape[1], t_ids.shape[1])
        return PairedBatch(
            SideBatch(s_ids, s_mask, s_labels, s_spans, s_start),
            SideBatch(t_ids, t_mask, t_labels, t_spans, t_start),
            num_spans,
            extras,
        )


class PairedDataset(Dataset):
    """Records paired on demand (`pair_example` in `__getitem__`, i.e. in data-loader workers)."""

    def __init__(
        self,
        records: Sequence[Record],
        student_tokenizer: PreTrainedTokenizerBase,
        teacher_tokenizer: PreTrainedTokenizerBase | None,
        max_length: int = 512,
        max_prompt_length: int = 256,
    ):
        """teacher_tokenizer None: only the student's side is tokenised (a method that reads the student alone)."""
        check_lengths(max_length, max_prompt_length)
        self.records = list(records)
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> PairedExample:
        return pair_example(
            self.records[index], self.student_tokenizer, self.teacher_tokenizer, self.max_length, self.max_prompt_length
        )
