"""ULD: Universal Logit Distillation (Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal Logit
Distillation Loss for LLMs", TMLR 2025, arXiv 2402.12030).

The i-th response prediction of the student is paired with the i-th of the teacher (both counted from the start of
the response, truncated to the shorter of the two). With p_i = softmax(z^T_i / tau_T) and q_i = softmax(z^S_i / tau_S)
sorted in decreasing order and the smaller vocabulary zero-padded to the larger,

    ULD_b = (1 / n_b) sum_{i < n_b} sum_k | q_i,(k) - p_i,(k) |,      n_b = min(|resp_S(b)|, |resp_T(b)|)
    distill = mean over samples with n_b > 0 of ULD_b

i.e. the closed form of the Wasserstein-1 distance between the two sorted distributions under a uniform cost.
Authors' setting (github.com/Nicolas-BZRD/llm-distillation, `DistillationLoss`): both temperatures 1, per-sample
mean over the paired positions, then mean over the batch. Their code reads the logits at the label positions; here
the distribution predicting response token t is logits[t - 1] on each side (the response tokens themselves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from sra_distill.data.batch import ModelView, PairedBatch, next_token_targets
from sra_distill.fields import setting
from sra_distill.losses.base import DistillMethod, MethodConfig, MethodContext, Needs


@dataclass
class ULDConfig(MethodConfig):
    """student_temperature, teacher_temperature: softmax temperatures before sorting (authors: 1 and 1)."""

    method_names: ClassVar[tuple[str, ...]] = ("uld",)

    student_temperature: float = setting(1.0, gt=0)
    teacher_temperature: float = setting(1.0, gt=0)

    def build(self, context: MethodContext) -> ULDLoss:
        return ULDLoss(self)


def paired_response_rows(
    student_mask: torch.Tensor, teacher_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair the i-th labelled row of each side per sample, up to the shorter side.

    Masks are [B, T_S] / [B, T_T] (True = row predicts a response token). Returns flat (sample, student_row,
    teacher_row) index tensors, one entry per pair.
    """
    samples, s_rows, t_rows = [], [], []
    for b in range(student_mask.shape[0]):
        s_idx = student_mask[b].nonzero().squeeze(-1)
        t_idx = teacher_mask[b].nonzero().squeeze(-1)
        n = min(len(s_idx), len(t_idx))
        samples.append(torch.full((n,), b, dtype=torch.long, device=student_mask.device))
        s_rows.append(s_idx[:n])
        t_rows.append(t_idx[:n])
    return torch.cat(samples), torch.cat(s_rows), torch.cat(t_rows)


def per_sample_mean(values: torch.Tensor, samples: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean of `values` within each sample, then mean over the samples that have any value (0 if none do)."""
    sums = values.new_zeros(batch_size).index_add(0, samples, values)
    counts = values.new_zeros(batch_size).index_add(0, samples, torch.ones_like(values))
    present = counts > 0
    if not present.any():
        return values.sum() * 0.0
    return (sums[present] / counts[present]).mean()


def sorted_l1(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Row-wise L1 distance between descending-sorted probability vectors, the shorter zero-padded [N, V] -> [N]."""
    s = student_probs.sort(-1, descending=True).values
    t = teacher_probs.sort(-1, descending=True).values
    width = max(s.shape[-1], t.shape[-1])
    s = F.pad(s, (0, width - s.shape[-1]))
    t = F.pad(t, (0, width - t.shape[-1]))
    return (s - t).abs().sum(-1)


class ULDLoss(DistillMethod):
    """Universal Logit Distillation (see the module docstring)."""

    config: ULDConfig

    def needs(self) -> Needs:
        return Needs(teacher_logits=True)

    def forward(self, batch: PairedBatch, student: ModelView, teacher: ModelView) -> dict[str, torch.Tensor]:
        s_mask, _ = next_token_targets(batch.student.labels)
        t_mask, _ = next_token_targets(batch.teacher.labels)
        samples, s_rows, t_rows = paired_response_rows(s_mask, t_mask)
        s_probs = torch.softmax(student.logits[samples, s_rows].float() / self.config.student_temperature, -1)
        t_probs = torch.softmax(teacher.logits[samples, t_rows].float() / self.config.teacher_temperature, -1)
        value = per_sample_mean(sorted_l1(s_probs, t_probs), samples, batch.batch_size)
        return {"distill": value, "uld": value.detach(), "uld_pairs": s_rows.new_tensor(len(s_rows)).float()}
