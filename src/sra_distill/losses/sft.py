"""SFT: supervised fine-tuning of the student alone, the baseline every distillation method is compared against.

loss = CE(student) on response tokens (computed by the engine, `base.causal_lm_ce`); distill = 0, and the teacher
is never run (`Needs(uses_teacher=False)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sra_distill.batch import ModelView, PairedBatch
from sra_distill.losses.base import DistillMethod, Needs


@dataclass
class SFTConfig:
    """SFT has no settings of its own (the engine's alpha is irrelevant: distill is always 0)."""


class SFTLoss(DistillMethod):
    """Cross-entropy only: the distillation term is a constant 0 on the student's device."""

    def __init__(
        self,
        config: SFTConfig,
        student_dim: int = 0,
        teacher_dim: int = 0,
        student_tokenizer=None,
        teacher_tokenizer=None,
        student_num_layers: int = 0,
        teacher_num_layers: int = 0,
    ):
        super().__init__()
        self.config = config

    def needs(self) -> Needs:
        return Needs(uses_teacher=False)

    def forward(self, batch: PairedBatch, student: ModelView, teacher: ModelView | None = None) -> dict:
        return {"distill": student.logits.new_zeros(())}
