"""Same-tokenizer token-level KD divergences: fkl, rkl, js, skl, srkl, akl.

With p = softmax(z_T / tau) the teacher's and q = softmax(z_S / tau) the student's next-token distributions at a
response position (the distribution predicting label t is the logits at t - 1), and lambda the skew:

* fkl  (forward KL):            KL(p || q) = sum_v p log(p / q)
* rkl  (reverse KL):            KL(q || p)
* js   (Jensen-Shannon):        (KL(p || m) + KL(q || m)) / 2, m = (p + q) / 2
* skl  (skewed forward KL):     KL(p || lambda p + (1 - lambda) q)
* srkl (skewed reverse KL):     KL(q || (1 - lambda) p + lambda q)
* akl  (adaptive KL, Wu et al., "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large Language
  Models", arXiv 2404.02657): sort the vocabulary by p ascending; the tail is the prefix whose cumulative teacher
  mass is < mu (mu = 0.5), the head the rest; g_head = sum_head |p - q|, g_tail = sum_tail |p - q| (no gradient);
  AKL = g_head / (g_head + g_tail) * fkl + g_tail / (g_head + g_tail) * rkl.

The loss is the mean over response tokens (sum over labelled positions / their count), no tau^2 factor. Formulas,
the skew 0.1 and mu 0.5 follow the public code of the DSKD lineage the SRA paper compares against
(songmzhang/DSKD, `criterions/various_divergence.py`), including its 1e-9 floor inside JS's logarithms.
These divergences compare distributions over one vocabulary, so the module refuses a cross-tokenizer pair.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from sra_distill.data.batch import ModelView, PairedBatch, next_token_targets
from sra_distill.fields import setting
from sra_distill.losses.base import DistillMethod, MethodConfig, MethodContext, Needs

KINDS = ("fkl", "rkl", "js", "skl", "srkl", "akl")


@dataclass
class DivergenceConfig(MethodConfig):
    """kind: one of fkl, rkl, js, skl, srkl, akl.
    temperature: KD temperature tau applied to both models' logits (DSKD scripts: 2.0).
    skew_lambda: lambda of the skewed KLs (0.1 as in DistiLLM / DSKD).
    akl_mu: AKL's head/tail split on cumulative teacher mass (0.5 as in the AKL paper and DSKD's default).
    """

    # The method names this one section serves; the name a run asks for is its kind (`kind` here is then unused).
    method_names: ClassVar[tuple[str, ...]] = KINDS

    kind: str = setting("fkl", choices=KINDS)
    temperature: float = setting(2.0, gt=0)
    skew_lambda: float = setting(0.1, ge=0, le=1)
    akl_mu: float = setting(0.5, ge=0, le=1)

    def build(self, context: MethodContext) -> DivergenceLoss:
        return DivergenceLoss(replace(self, kind=context.method), context.student_tokenizer, context.teacher_tokenizer)


def token_divergence(
    kind: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, config: DivergenceConfig
) -> torch.Tensor:
    """Per-row divergence [...] between student and teacher logits [..., V] (same vocabulary)."""
    tau = config.temperature
    s_logp = torch.log_softmax(student_logits.float() / tau, -1)
    t_logp = torch.log_softmax(teacher_logits.float() / tau, -1)
    s_p, t_p = s_logp.exp(), t_logp.exp()
    lam = config.skew_lambda
    if kind == "fkl":
        return (t_p * (t_logp - s_logp)).sum(-1)
    if kind == "rkl":
        return (s_p * (s_logp - t_logp)).sum(-1)
    if kind == "js":
        m_log = torch.log((s_p + t_p) / 2 + 1e-9)
        return 0.5 * (t_p * (torch.log(t_p + 1e-9) - m_log)).sum(-1) + 0.5 * (
            s_p * (torch.log(s_p + 1e-9) - m_log)
        ).sum(-1)
    if kind == "skl":
        return (t_p * (t_logp - torch.log(lam * t_p + (1 - lam) * s_p))).sum(-1)
    if kind == "srkl":
        return (s_p * (s_logp - torch.log((1 - lam) * t_p + lam * s_p))).sum(-1)
    if kind == "akl":
        sorted_t, order = t_p.sort(-1)  # ascending: the tail (small teacher probabilities) comes first
        gap = (sorted_t - s_p.gather(-1, order)).abs().detach()
        tail = sorted_t.cumsum(-1).lt(config.akl_mu)
        g_tail = (gap * tail).sum(-1)
        g_head = (gap * ~tail).sum(-1)
        total = (g_head + g_tail).clamp(min=1e-12)  # identical distributions: both gaps 0, both KLs 0
        fkl = (t_p * (t_logp - s_logp)).sum(-1)
        rkl = (s_p * (s_logp - t_logp)).sum(-1)
        return g_head / total * fkl + g_tail / total * rkl
    raise ValueError(f"unknown divergence kind {kind!r}; choose one of {', '.join(KINDS)}")


def same_vocabulary_or_raise(method: str, student_tokenizer, teacher_tokenizer) -> None:
    """Refuse a tokenizer pair whose vocabularies differ (the method compares logits id by id)."""
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError(
            f"{method} needs the same tokenizer on both sides, but the student's "
            f"({student_tokenizer.name_or_path!r}, {len(student_tokenizer)} tokens) and the teacher's "
            f"({teacher_tokenizer.name_or_path!r}, {len(teacher_tokenizer)} tokens) vocabularies differ; "
            f"use a cross-tokenizer method (sra, uld, mined, dskd, multilevel_ot)"
        )


class DivergenceLoss(DistillMethod):
    """Token-level KD between a student and a teacher that share one tokenizer (see the module docstring)."""

    def __init__(self, config: DivergenceConfig, student_tokenizer, teacher_tokenizer):
        super().__init__()
        same_vocabulary_or_raise(f"divergence {config.kind!r}", student_tokenizer, teacher_tokenizer)
        self.config = config

    def needs(self) -> Needs:
        return Needs(teacher_logits=True)

    def forward(self, batch: PairedBatch, student: ModelView, teacher: ModelView) -> dict[str, torch.Tensor]:
        if not torch.equal(batch.student.input_ids, batch.teacher.input_ids):
            raise ValueError(
                f"divergence {self.config.kind!r}: student and teacher input_ids differ; a same-tokenizer method "
                f"needs identical tokenizations"
            )
        mask, _ = next_token_targets(batch.student.labels)
        # Padded embedding rows differ between sizes of one family; ids past the tokenizer's are never targets.
        width = min(student.logits.shape[-1], teacher.logits.shape[-1])
        per_row = token_divergence(
            self.config.kind, student.logits[:, :-1, :width], teacher.logits[:, :-1, :width], self.config
        )
        value = (per_row * mask).sum() / mask.sum().clamp(min=1)
        return {"distill": value, self.config.kind: value.detach()}
