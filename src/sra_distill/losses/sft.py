"""SFT: supervised fine-tuning of the student alone, the baseline every distillation method is compared against.

loss = CE(student) on response tokens (computed by the engine, `logit_losses.causal_lm_ce`); distill = 0, and the teacher
is never run (`SFTConfig.uses_teacher` is False).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sra_distill.data.batch import ModelView, PairedBatch
from sra_distill.losses.base import DistillMethod, MethodConfig, MethodContext, Needs


@dataclass
class SFTConfig(MethodConfig):
    """SFT has no settings of its own (the engine's alpha is irrelevant: distill is always 0)."""

    method_names: ClassVar[tuple[str, ...]] = ("sft",)
    uses_teacher: ClassVar[bool] = False  # the engine loads no teacher and tokenises the student's side only

    def build(self, context: MethodContext) -> SFTLoss:
        return SFTLoss(self)


class SFTLoss(DistillMethod):
    """Cross-entropy only: the distillation term is a constant 0 on the student's device."""

    def __init__(self, config: SFTConfig | None = None):
        super().__init__()
        self.config = config or SFTConfig()

    def needs(self) -> Needs:
        return Needs()  # nothing beyond the student's logits, which the engine always captures

    def forward(self, batch: PairedBatch, student: ModelView, teacher: ModelView | None = None) -> dict:
        return {"distill": student.logits.new_zeros(())}
