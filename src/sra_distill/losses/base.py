"""The contract every distillation method follows, and the student's cross-entropy.

A method is a small `torch.nn.Module` (it owns its trainable parts, e.g. projectors) with:

* `needs() -> Needs`: what the engine must capture from each model in its single forward pass;
* `forward(batch, student, teacher) -> dict[str, Tensor]`: scalar tensors, always including `"distill"` (the
  distillation term, already combining the method's own components) and every component under its own name.

The engine combines `loss = alpha * ce + (1 - alpha) * distill`. A method never loads or calls a model.

Each method file holds the method's config dataclass beside its module; the config builds the module:

    XConfig.build(context: MethodContext) -> XLoss

one explicit constructor call passing only what the method uses (widths, layer counts, tokenizers, ... from the
`MethodContext`). A config whose method has trainable parts (projectors) has a `projector_lr` field: the engine
optimises those parameters at that rate. A config whose method never runs the teacher says so with the class
attribute `USES_TEACHER = False` (SFT): the engine then loads no teacher and tokenises the student's side only
(`PairedBatch.teacher` is None, and so are the context's teacher facts). Plugging a method in is one line: a field `x: XConfig` of
`config.MethodSettings` (its name is the method's name, and the section `methods.x` of the settings).

Per-token data that depends only on token ids (e.g. MinED's sequence alignment) is computed in the data pipeline,
not in the loss: a method may define the static hook

    collate_extras(examples: list[PairedExample], student_tokenizer, teacher_tokenizer) -> dict[str, Tensor]

which the collator calls in its workers on the examples of a batch; the result goes into `PairedBatch.extras`.
Tensors indexed by student positions are [B, T'] with T' = the longest student `input_ids` among the examples;
the loss pads or cuts them to the batch's T, so the collator may pad further.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sra_distill.data.batch import IGNORE_INDEX, next_token_targets


@dataclass(frozen=True)
class MethodContext:
    """The facts about the two models that methods are sized by (`methods.method_context` reads them)."""

    method: str  # the method name asked for (the same-tokenizer divergences share one config section)
    student_dim: int  # hidden sizes
    teacher_dim: int | None  # (the teacher's facts are None when the method loads no teacher)
    student_num_layers: int  # decoder blocks
    teacher_num_layers: int | None
    student_tokenizer: Any
    teacher_tokenizer: Any
    student_vocab_rows: int  # rows of each LM head (a padded embedding may exceed the tokenizer's size)
    teacher_vocab_rows: int | None


@dataclass(frozen=True)
class Needs:
    """What a method needs captured. Layer indices follow `ModelView.hidden` (num_layers = final-norm output);
    -1 means the last (final-norm) layer."""

    student_hidden_layers: tuple[int, ...] = ()
    teacher_hidden_layers: tuple[int, ...] = ()
    student_attention_layers: tuple[int, ...] = ()  # last non-pad token's attention row, summed over heads
    teacher_attention_layers: tuple[int, ...] = ()
    student_logits: bool = True  # the student's token logits are always needed for CE
    teacher_logits: bool = False
    uses_teacher: bool = True  # False for SFT: the engine then skips the teacher pass entirely
    # What `distill` is a mean over, so the engine can weight micro-batches into one global mean across processes
    # and accumulation steps: "samples" (divided by the batch size, as SRA) or "tokens" (response tokens).
    normalize_by: str = "samples"


def causal_lm_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions (labels aligned with inputs, shifted here)."""
    shift_logits = logits[:, :-1].float()
    _, targets = next_token_targets(labels)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


class DistillMethod(torch.nn.Module):
    """Base of every method module: trainable parts as submodules, `needs()` and `forward()` as above.

    `collate_extras(examples, student_tokenizer, teacher_tokenizer)` runs in data-loader workers on
    `PairedExample`s and returns per-batch tensors that land in `PairedBatch.extras` (e.g. MinED's token
    alignment); most methods need none.
    """

    def needs(self) -> Needs:
        raise NotImplementedError

    @staticmethod
    def collate_extras(examples: list, student_tokenizer, teacher_tokenizer) -> dict[str, torch.Tensor]:
        return {}
