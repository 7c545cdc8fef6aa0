"""The plain span KL the tests hold the library's to: each head applied to the centres, every [spans, V_shared]
tensor materialised, gradients by autograd (docs/sra-method.md, nothing chunked or fused)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sra_distill.losses.fused_span_kl import SharedHead


def head_function(head: SharedHead):
    """States -> the head's logits over the shared rows, differentiable in the states and the head."""
    rows = head.rows.to(head.weight.device)

    def logits(states: torch.Tensor) -> torch.Tensor:
        out = states.to(head.weight.dtype) @ head.weight[rows].T
        return out if head.bias is None else out + head.bias[rows]

    return logits


def plain_span_kl(student_centres, teacher_centres, student_logits, teacher_logits, temperature, divisor):
    """(1/divisor) sum over spans of KL(softmax(z^T / tau) || softmax(z^S / tau)); logits functions of the centres."""
    student = student_logits(student_centres).float() / temperature
    with torch.no_grad():
        teacher = teacher_logits(teacher_centres.detach()).float() / temperature
    divergence = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="sum")
    return divergence / divisor
