"""The contract every distillation method follows, and the student's cross-entropy.

A method is a small `torch.nn.Module` (it owns its trainable parts, e.g. projectors) with:

* `needs() -> Needs`: what the engine must capture from each model in its single forward pass;
* `forward(batch, student, teacher) -> dict[str, Tensor]`: scalar tensors, always including `"distill"` (the
  distillation term, already combining the method's own components) and every component under its own name.

The engine combines `loss = alpha * ce + (1 - alpha) * distill`. A method never loads or calls a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sra_distill.batch import IGNORE_INDEX


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


def causal_lm_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions (labels aligned with inputs, shifted here)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )
