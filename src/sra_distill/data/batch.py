"""The tensors that flow between the data pipeline, the model capture and the losses.

`PairedBatch` comes out of `collate.py` (tensors only, built in data-loader workers); `ModelView` comes out of
`capture.py` (one per model per batch). Losses are pure functions of these plus their own trainable modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SideTruncation:
    """What truncation removed from one side of one example."""

    prompt_tokens_dropped: int = 0
    response_tokens_dropped: int = 0
    eos_dropped: bool = False


@dataclass
class SideExample:
    """One tokenizer's encoding of one record: prompt tokens, then response tokens, then (unless truncated) EOS.

    offsets: [T, 2] int array, per token (char_start, char_end) into the RESPONSE text (same string on both sides,
        so spans line up even where the two prompts are rendered differently, e.g. by chat templates); prompt and
        special tokens carry (0, 0) and `special=True` / are before `response_start`.
    special: per token, True for special tokens (BOS/EOS/chat markers), which belong to no span.
    is_target: per token, True where the token is a training target (response tokens and the final EOS); the
        collator turns these flags into `SideBatch.labels` (token ids).
    truncation: what fitting the record into max_length / max_prompt_length removed.
    """

    input_ids: list[int]
    offsets: np.ndarray | list[tuple[int, int]]
    special: list[bool]
    is_target: list[bool]
    response_start: int
    truncation: SideTruncation = field(default_factory=SideTruncation)


@dataclass
class PairedExample:
    """The student's and the teacher's encodings of the same record (teacher None: a method that reads the student
    alone, SFT)."""

    student: SideExample
    teacher: SideExample | None
    response: str


@dataclass
class SideBatch:
    """One model's view of a batch of paired examples (right-padded).

    input_ids, attention_mask: [B, T].
    labels: [B, T], the token ids of response tokens (and the end-of-sequence token), IGNORE_INDEX elsewhere;
        aligned with input_ids (position t holds token t); the CE shift happens in the loss.
    span_ids: [B, T], the span each token belongs to, -1 outside spans; span k is the same text on both sides.
    response_start: [B], index of the first response token (on-policy generation reads the prompts before it).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    span_ids: torch.Tensor
    response_start: torch.Tensor

    def to(self, device: torch.device | str) -> "SideBatch":
        return SideBatch(*(getattr(self, f.name).to(device) for f in fields(self)))


@dataclass
class PairedBatch:
    """Student and teacher tokenizations of the same records, with their shared spans (teacher None: a method that
    reads the student alone; then there are no spans, num_spans is 0).

    num_spans: [B], number of spans per sample (span ids run 0..num_spans-1 on both sides).
    """

    student: SideBatch
    teacher: SideBatch | None
    num_spans: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.num_spans.shape[0])

    def to(self, device: torch.device | str) -> "PairedBatch":
        return PairedBatch(
            self.student.to(device),
            None if self.teacher is None else self.teacher.to(device),
            self.num_spans.to(device),
            {k: v.to(device) for k, v in self.extras.items()},
        )


@dataclass
class ModelView:
    """What one forward pass of a model yields for the losses.

    hidden: layer index -> hidden states [B, T, D]. Index `num_layers` (also reachable as -1 via `last_hidden`) is the
        final-norm output that feeds the LM head; index i < num_layers is the output of block i (HF's
        `hidden_states[i + 1]` convention is NOT used: keys are block indices, last = final-norm output).
    attention_row: layer index -> attention the last non-pad token pays to every token, summed over heads, [B, T]
        (detached). Present only for layers a method asked for.
    logits: [B, T, V] token logits, present only when a method asked for them (SRA never does for the teacher).
    lm_head_weight, lm_head_bias: the LM head's weight [V, D] and bias ([V] or None), which map hidden states to
        logits over the model's full vocabulary; losses restrict them to some rows before the product.
    input_embedding_weight: the model's input embedding matrix [V, D] (`get_input_embeddings().weight`; the same
        tensor as `lm_head_weight` for tied models), or None; DSKD's cross-model attention indexes tokens with it.
    logits_from_head: `logits` are the LM head's own output applied to `hidden[num_layers]` (or a dtype copy of
        it), with nothing applied after (no soft-capping, no scaling), so a loss may reuse them (SRA's span KL).
    """

    hidden: dict[int, torch.Tensor]
    attention_row: dict[int, torch.Tensor]
    logits: torch.Tensor | None
    lm_head_weight: torch.Tensor
    lm_head_bias: torch.Tensor | None = None
    num_layers: int = 0
    input_embedding_weight: torch.Tensor | None = None
    logits_from_head: bool = False

    @property
    def last_hidden(self) -> torch.Tensor:
        return self.hidden[self.num_layers]


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, targets), both [B, T-1]: row t of `logits[:, :-1]` predicts `targets[:, t]` = labels[:, t + 1] (the
    label shift, done here only); mask marks the rows whose target is labelled (not IGNORE_INDEX)."""
    targets = labels[:, 1:]
    return targets.ne(IGNORE_INDEX), targets


def last_real_position(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last position whose attention_mask is 1 (works for left and right padding)."""
    seq_len = attention_mask.shape[-1]
    return seq_len - 1 - attention_mask.flip(-1).to(torch.int64).argmax(dim=-1)
