"""MultiLevelOT (Cui et al., "Multi-Level Optimal Transport for Universal Cross-Tokenizer Knowledge Distillation on
Language Models", AAAI 2025, arXiv 2412.14528).

Per sample b, the response rows of each side (the logits predicting response tokens) are scaled by their standard
deviation over the vocabulary, soft-maxed (temperature tau), then *sequence-aware sorted*: the vocabulary is ordered
by its total probability over the sample's response rows (one order for the whole sequence, not per row) and cut
to the top k columns. With T (n_T x k) and S (n_S x k) these truncated matrices and n = min(n_T, n_S) rows paired
from the start of the response:

* token level, holistic absolute difference:   L_had = (1/n) sum_{i<n} sum_c |T_ic - S_ic|
* token level, sequential logarithmic:         L_log = -(1/n) sum_{i<n} sum_c softmax(S_i)_c log softmax(T_i)_c
* sequence level, Sinkhorn distance:           L_sk = <P, C>,  C_ij = || softmax(T_i / tau_sk) - softmax(S_j / tau_sk) ||_1
  over all n_T x n_S row pairs, P the entropic OT plan (epsilon) with uniform marginals, by log-domain Sinkhorn;
  lengths may differ, no token correspondence is assumed.

distill = mean over samples of (w_had L_had + w_log L_log + w_sk L_sk).

Where the paper is terse this follows the authors' code (github.com/2018cx/Multi-Level-OT, `DistillationLoss`):
std scaling without centring, top-50, L_log as the cross-entropy of the soft-maxed truncated rows with weight 0.1,
the Sinkhorn cost at temperature 2 with epsilon 0.1 and 10 iterations. Deviations, for a loss that does not depend
on the rest of the batch: the sort order is per sample (theirs: summed over the batch), and the Sinkhorn plan
has uniform marginals of total mass 1 (theirs: row/column rescaling of the kernel, mass ~ sequence length, times
1e-4); `sinkhorn_weight` 0.1 puts it on the scale of the other terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sra_distill.data.batch import ModelView, PairedBatch, next_token_targets
from sra_distill.fields import setting
from sra_distill.losses.base import DistillMethod, MethodConfig, MethodContext, Needs


@dataclass
class MultiLevelOTConfig(MethodConfig):
    """top_k: vocabulary columns kept after the sequence-aware sort (authors: 50).
    temperature: softmax temperature of both models' (std-scaled) logits (authors: 1).
    sinkhorn_temperature: softmax temperature of the truncated rows inside the Sinkhorn cost (authors: 2).
    sinkhorn_epsilon: entropic regularisation epsilon (authors: 0.1).
    sinkhorn_iterations: Sinkhorn iterations (authors: 10).
    had_weight, log_weight, sinkhorn_weight: weights of the three terms (authors: 1, 0.1, 0.1).
    """

    method_names: ClassVar[tuple[str, ...]] = ("multilevel_ot",)

    top_k: int = setting(50, ge=1)
    temperature: float = setting(1.0, gt=0)
    sinkhorn_temperature: float = setting(2.0, gt=0)
    sinkhorn_epsilon: float = setting(0.1, gt=0)
    sinkhorn_iterations: int = setting(10, ge=1)
    had_weight: float = setting(1.0, ge=0)
    log_weight: float = setting(0.1, ge=0)
    sinkhorn_weight: float = setting(0.1, ge=0)

    def build(self, context: MethodContext) -> MultiLevelOTLoss:
        return MultiLevelOTLoss(self)


def sequence_sorted_topk(logits: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """Std-scaled softmax rows [n, V] -> [n, k]: columns ordered by total probability over the rows, top k kept."""
    probs = torch.softmax(logits.float() / (logits.float().std(-1, keepdim=True) + 1e-4) / temperature, -1)
    order = probs.sum(0).argsort(descending=True)[:top_k]
    return probs[:, order]


def sinkhorn_cost(cost: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """<P, C> for the entropic OT plan P between uniform marginals on the rows and columns of `cost` [n, m]."""
    n, m = cost.shape
    log_a = torch.full((n,), -torch.log(torch.tensor(float(n))).item(), device=cost.device)
    log_b = torch.full((m,), -torch.log(torch.tensor(float(m))).item(), device=cost.device)
    f = torch.zeros(n, device=cost.device)
    g = torch.zeros(m, device=cost.device)
    for _ in range(iterations):
        f = epsilon * (log_a - torch.logsumexp((g[None, :] - cost) / epsilon, 1))
        g = epsilon * (log_b - torch.logsumexp((f[:, None] - cost) / epsilon, 0))
    plan = torch.exp((f[:, None] + g[None, :] - cost) / epsilon)
    return (plan * cost).sum()


class MultiLevelOTLoss(DistillMethod):
    """Token- and sequence-level optimal transport over sorted, truncated distributions (see the module docstring)."""

    config: MultiLevelOTConfig

    def needs(self) -> Needs:
        return Needs(teacher_logits=True)

    def sample_terms(self, student_rows: torch.Tensor, teacher_rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The three terms for one sample's response rows (student [n_S, V_S], teacher [n_T, V_T])."""
        c = self.config
        s = sequence_sorted_topk(student_rows, c.top_k, c.temperature)
        t = sequence_sorted_topk(teacher_rows.detach(), c.top_k, c.temperature)
        width = max(s.shape[1], t.shape[1])  # a vocabulary smaller than k is zero-padded
        s = torch.nn.functional.pad(s, (0, width - s.shape[1]))
        t = torch.nn.functional.pad(t, (0, width - t.shape[1]))
        n = min(len(s), len(t))
        had = (s[:n] - t[:n]).abs().sum(-1).mean()
        log = -(torch.softmax(s[:n], -1) * torch.log_softmax(t[:n], -1)).sum(-1).mean()
        cost = torch.cdist(
            torch.softmax(t / c.sinkhorn_temperature, -1), torch.softmax(s / c.sinkhorn_temperature, -1), p=1
        )
        return {"ot_had": had, "ot_log": log, "ot_sinkhorn": sinkhorn_cost(cost, c.sinkhorn_epsilon, c.sinkhorn_iterations)}

    def forward(self, batch: PairedBatch, student: ModelView, teacher: ModelView) -> dict[str, torch.Tensor]:
        s_mask, _ = next_token_targets(batch.student.labels)
        t_mask, _ = next_token_targets(batch.teacher.labels)
        per_sample = [
            self.sample_terms(student.logits[b, :-1][s_mask[b]], teacher.logits[b, :-1][t_mask[b]])
            for b in range(batch.batch_size)
            if s_mask[b].any() and t_mask[b].any()
        ]
        if not per_sample:
            zero = student.logits.sum() * 0.0
            return {"distill": zero, "ot_had": zero.detach(), "ot_log": zero.detach(), "ot_sinkhorn": zero.detach()}
        terms = {name: torch.stack([s[name] for s in per_sample]).mean() for name in per_sample[0]}
        c = self.config
        distill = c.had_weight * terms["ot_had"] + c.log_weight * terms["ot_log"] + c.sinkhorn_weight * terms["ot_sinkhorn"]
        return {"distill": distill, **{name: value.detach() for name, value in terms.items()}}
