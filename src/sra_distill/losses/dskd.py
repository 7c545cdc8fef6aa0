"""DSKD with cross-model attention (Zhang et al., "Dual-Space Knowledge Distillation for Large Language Models",
EMNLP 2024, arXiv 2406.17328; the CMA variant of its public code, songmzhang/DSKD,
`criterions/dual_space_kd_with_cross_model_attention.py`).

Rows are the positions that predict a response token on each side (input token x_t, target y_t = x_{t+1}).
With E_S, E_T the input embeddings, h^S, h^T the last hidden states, W_S, W_T the LM heads (no gradient), and
std(.) a scalar standard deviation over the response rows:

    q_i  = P_q([E_S x_i ; E_S y_i])                       (student queries, 2 d_S -> 2 d_T)
    k_j  = [E_T x_j ; E_T y_j] / std                       (teacher keys)
    A    = softmax_j(q_i . k_j / sqrt(2 d_T))             (student rows attend over teacher rows; transposed
                                                            and soft-maxed over i for the other direction)
    t2s_i = sum_j A_ij P_t2s(h^T_j / std + E_T y_j / std)  -> logits W_S t2s_i     (teacher in student space)
    s2t_j = sum_i A^T_ji P_s2t(h^S_i)                      -> logits W_T s2t_j     (student in teacher space)

    distill = [ CE(W_S t2s, y)                                            (trains P_t2s, P_q)
              + sum_i [argmax W_S t2s_i = y_i] D(W_S t2s_i (no grad) || z^S_i)   (KD in the student space)
              + sum_j KL(softmax(z^T_j / tau) || softmax(W_T s2t_j / tau)) ] / N_S   (KD in the teacher space)

D is the configured divergence at temperature tau (their scripts: forward KL, tau = 2.0, projector lr 1e-3); all
sums run over response rows and, as in their code, everything is divided by the number of student response tokens
N_S. Logged: t2s_acc (fraction of student rows where the projected teacher predicts the gold token; these rows
carry the student-space KD), s2t_acc (the same on teacher rows), max_t2s_prob (mean top probability of W_S t2s).
One deviation: the standard deviations are taken over response rows only (theirs: the whole padded tensor), so a
batch's padding does not change the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from sra_distill.data.batch import ModelView, PairedBatch, next_token_targets
from sra_distill.fields import setting
from sra_distill.losses.base import DistillMethod, MethodConfig, MethodContext, Needs
from sra_distill.losses.divergences import KINDS, DivergenceConfig, token_divergence


@dataclass
class DSKDConfig(MethodConfig):
    """temperature: KD temperature tau (DSKD scripts: 2.0).
    kd_objective: divergence of the student-space KD, one of fkl, rkl, js, skl, srkl, akl (scripts: fkl).
    projector_lr: learning rate of the three projectors (DSKD scripts: 1e-3).
    """

    method_names: ClassVar[tuple[str, ...]] = ("dskd",)

    temperature: float = setting(2.0, gt=0)
    kd_objective: str = setting("fkl", choices=KINDS)
    projector_lr: float = setting(1e-3, gt=0)

    def build(self, context: MethodContext) -> DSKDLoss:
        return DSKDLoss(self, context.student_dim, context.teacher_dim)


def _side_rows(view: ModelView, side, name: str):
    """Shifted tensors for one side: (mask, input ids, targets, hidden) over rows 0..T-2, pads set to id 0."""
    if view.input_embedding_weight is None:
        raise ValueError(f"DSKD needs the {name}'s input embeddings: ModelView.input_embedding_weight is None")
    mask, targets = next_token_targets(side.labels)
    inputs = torch.where(mask, side.input_ids[:, :-1], torch.zeros_like(targets))
    targets = torch.where(mask, targets, torch.zeros_like(targets))
    return mask, inputs, targets, view.last_hidden[:, :-1]


def _frozen_head(view: ModelView, states: torch.Tensor) -> torch.Tensor:
    """Logits of `states` through the model's LM head, without gradient to the head (as in DSKD)."""
    weight = view.lm_head_weight.detach()
    out = states.to(weight.dtype) @ weight.T
    return out if view.lm_head_bias is None else out + view.lm_head_bias.detach()


def _masked_std(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return values[mask].float().std().clamp(min=1e-6)


class DSKDLoss(DistillMethod):
    """Dual-space KD with cross-model attention (see the module docstring); owns the three projectors."""

    def __init__(self, config: DSKDConfig, student_dim: int, teacher_dim: int):
        super().__init__()
        self.config = config
        self.teacher_dim = teacher_dim
        self.query = torch.nn.Linear(2 * student_dim, 2 * teacher_dim)
        self.s2t = torch.nn.Linear(student_dim, teacher_dim)
        self.t2s = torch.nn.Linear(teacher_dim, student_dim)
        self.divergence = DivergenceConfig(kind=config.kd_objective, temperature=config.temperature)

    def needs(self) -> Needs:
        return Needs(student_hidden_layers=(-1,), teacher_hidden_layers=(-1,), teacher_logits=True)

    def forward(self, batch: PairedBatch, student: ModelView, teacher: ModelView) -> dict[str, torch.Tensor]:
        s_mask, s_in, s_tgt, s_hidden = _side_rows(student, batch.student, "student")
        t_mask, t_in, t_tgt, t_hidden = _side_rows(teacher, batch.teacher, "teacher")
        e_s = student.input_embedding_weight.detach()
        e_t = teacher.input_embedding_weight.detach()
        s_index = torch.cat([e_s[s_in], e_s[s_tgt]], -1).float()
        t_index = torch.cat([e_t[t_in], e_t[t_tgt]], -1).float()
        t_target = e_t[t_tgt].float()
        t_hidden = t_hidden.detach().float()

        queries = self.query(s_index.to(self.query.weight.dtype)).float()
        keys = t_index / _masked_std(t_index, t_mask)
        teacher_values = self.t2s(
            (t_hidden / _masked_std(t_hidden, t_mask) + t_target / _masked_std(t_target, t_mask)).to(
                self.t2s.weight.dtype
            )
        ).float()
        student_values = self.s2t(s_hidden.to(self.s2t.weight.dtype)).float()

        scores = queries @ keys.transpose(-1, -2) / math.sqrt(2 * self.teacher_dim)
        pair_mask = s_mask.unsqueeze(-1) & t_mask.unsqueeze(1)
        scores = scores.masked_fill(~pair_mask, -1e5)

        n_student = s_mask.sum().clamp(min=1)
        t2s_logits = _frozen_head(student, torch.softmax(scores, -1) @ teacher_values).float()
        t2s_ce = F.cross_entropy(t2s_logits[s_mask], s_tgt[s_mask], reduction="sum") / n_student
        t2s_hit = t2s_logits.argmax(-1).eq(s_tgt) & s_mask
        t2s_kd = (
            token_divergence(self.config.kd_objective, student.logits[:, :-1], t2s_logits.detach(), self.divergence)
            * t2s_hit
        ).sum() / n_student

        s2t_logits = _frozen_head(teacher, torch.softmax(scores.transpose(-1, -2), -1) @ student_values).float()
        s2t_kd = (
            token_divergence("fkl", s2t_logits, teacher.logits[:, :-1].detach(), self.divergence) * t_mask
        ).sum() / n_student
        s2t_hit = s2t_logits.argmax(-1).eq(t_tgt) & t_mask

        distill = t2s_ce + t2s_kd + s2t_kd
        with torch.no_grad():
            max_prob = (torch.softmax(t2s_logits, -1).amax(-1) * s_mask).sum() / n_student
        return {
            "distill": distill,
            "t2s_ce": t2s_ce.detach(),
            "t2s_kd": t2s_kd.detach(),
            "s2t_kd": s2t_kd.detach(),
            "t2s_acc": t2s_hit.sum() / n_student,
            "s2t_acc": s2t_hit.sum() / t_mask.sum().clamp(min=1),
            "max_t2s_prob": max_prob,
        }
