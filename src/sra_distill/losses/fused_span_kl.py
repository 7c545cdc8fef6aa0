"""SRA's span KL fused with the two LM heads, chunked over spans: the fast path of `sra.span_kl`.

    L_kl = (1/B) sum_spans KL( softmax(z^T / tau) || softmax(z^S / tau) ),   z = C W_rows^T (+ b_rows)

with W_rows each model's LM head restricted to the shared vocabulary. The plain form materialises several
[spans, V_shared] float32 tensors (logits, log-softmaxes, the KL's elementwise terms, and their gradients) — with
about one span per token that is a second full-sequence logit distillation. Here each chunk of spans computes its
logits, its loss and, at once, the loss's gradient (d L / d z^S = (softmax(z^S/tau) - softmax(z^T/tau)) / (tau B)),
which it folds into the gradients of the student centres and head rows before the chunk is freed; backward only
scales those by the incoming gradient (the technique of fused linear cross-entropy kernels, e.g. Liger-Kernel).
Peak extra memory is one chunk of logits instead of ~4 full [spans, V] tensors. The teacher product stays in the
teacher's own precision (bf16 teachers stay bf16); everything else is float32.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 256  # spans per chunk: 256 x 37k shared ids x 4 bytes = 38 MB per temporary


def _logits(states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float) -> torch.Tensor:
    out = (states.to(weight.dtype) @ weight.T).float()
    if bias is not None:
        out += bias.float()
    return out.div_(temperature)


class _FusedSpanKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_states, student_weight, student_bias, teacher_states, teacher_weight, teacher_bias,
                temperature, batch_size, chunk):
        scale = 1.0 / (temperature * batch_size)
        grad_states = torch.zeros_like(student_states, dtype=torch.float32)
        grad_weight = torch.zeros_like(student_weight, dtype=torch.float32)
        grad_bias = None if student_bias is None else torch.zeros_like(student_bias, dtype=torch.float32)
        weight32 = student_weight.float()
        total = torch.zeros((), dtype=torch.float32, device=student_states.device)
        for start in range(0, student_states.shape[0], chunk):
            s = student_states[start : start + chunk].float()
            log_q = torch.log_softmax(_logits(s, weight32, student_bias, temperature), dim=-1)
            log_p = torch.log_softmax(_logits(teacher_states[start : start + chunk], teacher_weight, teacher_bias,
                                              temperature), dim=-1)
            p = log_p.exp()
            # KL = sum p (log p - log q); its gradient w.r.t. z^S/tau is q - p.
            total += (p * (log_p - log_q)).sum()
            g = log_q.exp_().sub_(p).mul_(scale)  # reuses log_q's storage: [chunk, V]
            grad_states[start : start + chunk] = g @ weight32
            grad_weight.addmm_(g.T, s)
            if grad_bias is not None:
                grad_bias += g.sum(0)
        ctx.save_for_backward(grad_states, grad_weight, grad_bias)
        ctx.dtypes = (student_states.dtype, student_weight.dtype)
        return total / batch_size

    @staticmethod
    def backward(ctx, grad_output):
        grad_states, grad_weight, grad_bias = ctx.saved_tensors
        states_dtype, weight_dtype = ctx.dtypes
        return (
            (grad_states * grad_output).to(states_dtype),
            (grad_weight * grad_output).to(weight_dtype),
            None if grad_bias is None else (grad_bias * grad_output).to(weight_dtype),
            None, None, None, None, None, None,
        )


def fused_span_kl(
    student_states: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_states: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    temperature: float,
    batch_size: int,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """L_kl for N valid spans: states [N, D_side], head rows [V_shared, D_side] (+ bias [V_shared]); see module doc.

    Gradients reach the student states, weight rows and bias; the teacher side is treated as a constant.
    """
    if student_states.shape[0] != teacher_states.shape[0]:
        raise ValueError(f"span counts differ: student {student_states.shape[0]}, teacher {teacher_states.shape[0]}")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"head rows differ: student {student_weight.shape[0]}, teacher {teacher_weight.shape[0]}; both heads "
            "must be restricted to the same shared vocabulary"
        )
    if student_states.shape[0] == 0:
        return (student_states.sum() * 0.0).float()  # keeps the graph connected, value 0
    return _FusedSpanKL.apply(
        student_states, student_weight, student_bias, teacher_states.detach(), teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(), float(temperature), int(batch_size), int(chunk),
    )
