"""SRA's span KL with its backward written out, chunked over spans (the only L_kl path of `losses/sra.py`).

    L_kl = (1/D) sum_k KL( softmax(z^T_k / tau) || softmax(z^S_k / tau) ),   z_k = C_k W_rows^T (+ b_rows)

C_k a span's centre on each side, W_rows / b_rows each model's LM head restricted to the shared vocabulary
(`SharedHead`), D the divisor (the batch size in the paper; `sra.kl_divisor`). The plain form materialises several
[spans, V_shared] float32 tensors (logits, log-softmaxes, the KL's terms and all their gradients): with about one
span per token that is a second full-sequence logit distillation. `span_kl` holds one chunk of spans at a time:

* forward, per chunk: both sides' logits, their log-sum-exps ([spans] each, kept) and the KL as
  KL_k = sum_v p_v (z^T_v - z^S_v) / tau - lse^T_k + lse^S_k   (p = softmax(z^T / tau); no log-softmax tensors);
* backward, per chunk: the logits again, g = d L / d(z^S / tau) = (softmax(z^S / tau) - p) x grad / D, and from it
  the gradients of the student's centres (g W_rows / tau), head rows (g^T C / tau) and bias rows (sum g / tau).

Between the two passes only the inputs and the log-sum-exps are kept, so the backward can run again
(`retain_graph=True`) and gives the same gradients; nothing is added to any other tensor's gradient.

Student span logits from its token logits: with a bias-free head and centres pooled from the head's input,
z^S_k = C_k W^T = sum_{t in k} a_t z_t (C_k = sum_t a_t h_t, a_t the pooling weight: m_t / max(M_k, 1e-5), or 1/|k|).
The student's CE has computed z_t already, so given them (`token_logits`, with `SpanTokens` saying which tokens pool
into which span) both passes gather z^S from them instead of multiplying the centres with the head; the gradient
still reaches the centres and the head rows as above. The teacher product stays in the teacher's own precision
(bf16 teachers stay bf16); everything else is float32.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK = 128  # spans per chunk: 128 x 37k shared ids x 4 bytes = 19 MB per temporary


def head_product(states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """states [n, D] @ weight [V, D]^T in the head's dtype: every LM-head product of the span KL."""
    return states.to(weight.dtype) @ weight.T


def scaled_logits(product: torch.Tensor, bias: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """z / tau in float32 from a head product (+ bias)."""
    out = product.float()
    if bias is not None:
        out += bias.float()
    return out.div_(temperature)


@dataclass(frozen=True)
class SharedHead:
    """A model's LM head restricted to the shared vocabulary: z = states @ weight[rows]^T (+ bias[rows]).

    weight [V, D] and bias [V] (or None) are the head's own tensors; rows [V_shared] this model's shared ids
    (`vocab.SharedVocab.student_ids` / `teacher_ids`), in the same order on both sides.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    rows: torch.Tensor

    def select(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """The shared rows of the head's weight or bias (None stays None), a detached contiguous copy."""
        return None if tensor is None else tensor.detach().index_select(0, self.rows.to(tensor.device))


@dataclass(frozen=True)
class SpanTokens:
    """Which student tokens make up which span, and with which pooling weight a_t (C_k = sum_{t in k} a_t h_t).

    positions [M]: flat index b * T + t of each token; spans [M]: its span, 0..N-1, non-decreasing; weights [M]:
    a_t (float32). Every span has at least one token.
    """

    positions: torch.Tensor
    spans: torch.Tensor
    weights: torch.Tensor
    num_spans: int

    def chunks(self, chunk: int) -> list[tuple[int, int, int, int]]:
        """(first span, end span, first token, end token) per chunk of `chunk` spans (one host sync)."""
        starts = torch.arange(0, self.num_spans + chunk, chunk, device=self.spans.device).clamp_max(self.num_spans)
        bounds = torch.searchsorted(self.spans, starts).tolist()
        spans = starts.tolist()
        return [(spans[i], spans[i + 1], bounds[i], bounds[i + 1])
                for i in range(len(spans) - 1) if spans[i + 1] > spans[i]]

    def pooled(self, flat_logits: torch.Tensor, rows: torch.Tensor, bounds: tuple[int, int, int, int],
               temperature: float) -> torch.Tensor:
        """z^S / tau [spans, V_shared] float32 for the chunk `bounds`: the token logits [B*T, V] pooled per span."""
        first, end, token_first, token_end = bounds
        index = (self.positions[token_first:token_end, None], rows[None, :])
        picked = flat_logits[index].float().mul_(self.weights[token_first:token_end, None] / temperature)
        if token_end - token_first == end - first:  # one token per span: nothing to pool
            return picked
        pooled = torch.zeros(end - first, rows.shape[0], dtype=torch.float32, device=picked.device)
        return pooled.index_add_(0, self.spans[token_first:token_end] - first, picked)


@dataclass(frozen=True)
class _Plan:
    """The span KL's constants (no gradient): both heads, the teacher's centres, how to chunk."""

    student_head: SharedHead
    teacher_head: SharedHead
    teacher_centres: torch.Tensor
    temperature: float
    divisor: int
    chunk: int
    tokens: SpanTokens | None  # set when the student's logits come from its token logits
    keep_teacher_logits: bool

    def bounds(self, num_spans: int) -> list[tuple[int, int, int, int]]:
        """(first span, end span, first token, end token) per chunk (token bounds 0 without `tokens`)."""
        if self.tokens is not None:
            return self.tokens.chunks(self.chunk)
        return [(first, min(first + self.chunk, num_spans), 0, 0) for first in range(0, num_spans, self.chunk)]

    def student_logits(self, centres, weight_rows, bias_rows, token_logits, bounds) -> torch.Tensor:
        """z^S / tau [spans, V_shared] float32 for one chunk: pooled token logits, or the head on the centres."""
        if token_logits is not None:
            return self.tokens.pooled(token_logits, self.student_head.rows, bounds, self.temperature)
        return scaled_logits(head_product(centres[bounds[0]:bounds[1]], weight_rows), bias_rows, self.temperature)


class _SpanKL(torch.autograd.Function):
    """L_kl (module docstring) as a function of the student's centres, head weight and head bias."""

    @staticmethod
    def forward(ctx, centres, weight, bias, token_logits, plan: _Plan):
        # Without autocast: the backward (which autocast never covers) recomputes these logits and must match them.
        with torch.autocast(centres.device.type, enabled=False):
            student = plan.student_head
            weight_rows = None if token_logits is not None else student.select(weight)
            bias_rows = student.select(bias)
            teacher = plan.teacher_head
            teacher_weight, teacher_bias = teacher.select(teacher.weight), teacher.select(teacher.bias)
            num_spans = centres.shape[0]
            norms = torch.empty(2, num_spans, dtype=torch.float32, device=centres.device)  # lse^S, lse^T per span
            kept = None
            if plan.keep_teacher_logits:
                kept = torch.empty(num_spans, teacher_weight.shape[0], dtype=teacher_weight.dtype,
                                   device=centres.device)
            total = torch.zeros((), dtype=torch.float32, device=centres.device)
            for bounds in plan.bounds(num_spans):
                first, end = bounds[0], bounds[1]
                z_student = plan.student_logits(centres, weight_rows, bias_rows, token_logits, bounds)
                product = head_product(plan.teacher_centres[first:end], teacher_weight)
                if kept is not None:
                    kept[first:end] = product
                z_teacher = scaled_logits(product, teacher_bias, plan.temperature)
                torch.logsumexp(z_student, -1, out=norms[0, first:end])
                torch.logsumexp(z_teacher, -1, out=norms[1, first:end])
                difference = torch.sub(z_teacher, z_student, out=z_student)
                p = z_teacher.sub_(norms[1, first:end, None]).exp_()
                total += torch.dot(p.view(-1), difference.view(-1))
            total += (norms[0] - norms[1]).sum()
        ctx.plan = plan
        ctx.save_for_backward(centres, weight, bias, token_logits, norms, kept)
        return total / plan.divisor

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        centres, weight, bias, token_logits, norms, kept = ctx.saved_tensors
        plan: _Plan = ctx.plan
        student, teacher = plan.student_head, plan.teacher_head
        weight_rows, bias_rows = student.select(weight), student.select(bias)
        weight_rows32 = weight_rows.float()
        teacher_weight = teacher.select(teacher.weight) if kept is None else None
        teacher_bias = teacher.select(teacher.bias)
        scale = grad_output.float() / (plan.divisor * plan.temperature)  # d(z / tau) / dz = 1 / tau
        grad_centres = torch.empty_like(centres, dtype=torch.float32)
        grad_rows = torch.zeros_like(weight_rows32)
        grad_bias_rows = None if bias is None else torch.zeros(weight_rows.shape[0], device=centres.device)
        for bounds in plan.bounds(centres.shape[0]):
            first, end = bounds[0], bounds[1]
            q = plan.student_logits(centres, weight_rows, bias_rows, token_logits, bounds)
            q = q.sub_(norms[0, first:end, None]).exp_()
            if kept is None:
                product = head_product(plan.teacher_centres[first:end], teacher_weight)
            else:
                product = kept[first:end]
            p = scaled_logits(product, teacher_bias, plan.temperature).sub_(norms[1, first:end, None]).exp_()
            g = q.sub_(p).mul_(scale)  # d L / d z^S, [spans, V_shared]
            grad_centres[first:end] = g @ weight_rows32
            grad_rows.addmm_(g.T, centres[first:end].float())
            if grad_bias_rows is not None:
                grad_bias_rows += g.sum(0)
        return (grad_centres.to(centres.dtype), _scatter_rows(grad_rows, weight, student.rows),
                _scatter_rows(grad_bias_rows, bias, student.rows), None, None)


def _scatter_rows(grad_rows: torch.Tensor | None, like: torch.Tensor | None, rows: torch.Tensor):
    """The gradient of a whole head tensor from that of its shared rows; index_add_ sums repeated ids."""
    if grad_rows is None:
        return None
    full = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    return full.index_add_(0, rows.to(like.device), grad_rows).to(like.dtype)


def span_kl(
    student_centres: torch.Tensor,
    student_head: SharedHead,
    teacher_centres: torch.Tensor,
    teacher_head: SharedHead,
    temperature: float,
    divisor: int,
    *,
    token_logits: torch.Tensor | None = None,
    tokens: SpanTokens | None = None,
    keep_teacher_logits: bool = False,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """L_kl (module docstring) of N aligned spans: centres [N, D_side] per side, float32 scalar.

    Gradients reach the student's centres, head weight and bias; the teacher side is a constant. token_logits
    [B, T, V]: the student's token logits z_t = h_t W^T exactly (a bias-free head, nothing applied after), whose pooling
    by `tokens` gives the centres; both or neither. keep_teacher_logits: keep the teacher's [N, V_shared] product
    (its dtype) from the forward for the backward (memory) instead of computing it again there (time).
    """
    if student_centres.shape[0] != teacher_centres.shape[0]:
        raise ValueError(f"span counts differ: student {student_centres.shape[0]}, teacher {teacher_centres.shape[0]}")
    if student_head.rows.shape[0] != teacher_head.rows.shape[0]:
        raise ValueError(
            f"head rows differ: student {student_head.rows.shape[0]}, teacher {teacher_head.rows.shape[0]}; both "
            "heads must be restricted to the same shared vocabulary"
        )
    if (token_logits is None) != (tokens is None):
        raise ValueError("give token_logits and tokens together, or neither")
    if token_logits is not None:
        if student_head.bias is not None:
            raise ValueError("token logits stand for the span logits only with a bias-free student head")
        if tokens.num_spans != student_centres.shape[0]:
            raise ValueError(f"tokens describe {tokens.num_spans} spans, the centres {student_centres.shape[0]}")
        token_logits = token_logits.detach().reshape(-1, token_logits.shape[-1])
    if student_centres.shape[0] == 0:
        return (student_centres.sum() * 0.0).float()  # keeps the graph connected, value 0
    device = student_centres.device  # the shared ids index tensors there
    student_head = replace(student_head, rows=student_head.rows.to(device))
    plan = _Plan(student_head, teacher_head, teacher_centres.detach(), float(temperature), int(divisor), int(chunk),
                 tokens, keep_teacher_logits)
    return _SpanKL.apply(student_centres, student_head.weight, student_head.bias, token_logits, plan)
