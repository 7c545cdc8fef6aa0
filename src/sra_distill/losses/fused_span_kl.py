"""SRA's span KL with its backward written out, chunked over spans: L_kl of `losses/sra.py` from the centres.

    L_kl = (1/D) sum_k KL( softmax(z^T_k / tau) || softmax(z^S_k / tau) ),   z_k = C_k W_rows^T (+ b_rows)

C_k a span's centre on each side, W_rows / b_rows each model's LM head restricted to the shared vocabulary
(`SharedHead`), D the divisor (the batch size in the paper; `sra.kl_divisor`). The plain form materialises several
[spans, V_shared] float32 tensors (logits, log-softmaxes, the KL's terms and all their gradients): with about one
span per token that is a second full-sequence logit distillation. `span_kl` is a `torch.autograd.Function` that
holds one chunk of spans at a time and writes both passes out (the technique of fused linear cross-entropy kernels,
e.g. Liger-Kernel):

* forward, per chunk: both sides' logits and log-softmaxes, the KL, and at once its gradient
  g = d L / d z^S = (softmax(z^S / tau) - softmax(z^T / tau)) / (tau D), folded into the gradients of the student's
  centres (g W_rows), head rows (g^T C) and bias rows (sum g) before the chunk is freed;
* backward: those three times the incoming gradient, the head's rows scattered into its whole [V, D] shape.

Between the passes only those gradients are kept ([spans, D_S], [V_shared, D_S], [V_shared]); the backward consumes
nothing, so it can run again (`retain_graph=True`), and it writes into no other tensor's gradient. Peak extra memory
is one chunk's few [chunk, V_shared] temporaries. Under no_grad the gradient products are skipped.

When the student's span logits are its pooled token logits (a bias-free head on the layer the centres pool), the
engine's path is `logit_losses.ce_and_span_kl` instead: the same L_kl, computed in one node with the student's CE so
that its gradient goes into the CE's logit gradient. Here the head is applied to the centres. The teacher's product
stays in the teacher's own precision (bf16 teachers stay bf16, except on CPUs without a fast bf16 product:
`product_dtype`); everything else is float32, outside any autocast.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK = 128  # spans per chunk: 128 x 37k shared ids x 4 bytes = 19 MB per temporary (3 of them)


def slow_half_products(device: torch.device) -> bool:
    """True on a CPU without AVX-512 (`torch.backends.cpu.get_cpu_capability()`), where torch has no fast bf16 / fp16
    matrix product: on an AVX2 EPYC, [900, 576] @ [576, 37k] took 8.4 s in bf16 and 1.1 s in float32 (one thread),
    and the demo's whole step with a bf16 teacher 3.8x as long as with a float32 one (`benchmarks/results/
    step_cost_avx2.md`)."""
    return device.type == "cpu" and torch.backends.cpu.get_cpu_capability() != "AVX512"


def product_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype an LM-head product of the span KL computes in: the head's own, except a bf16/fp16 head where half
    products are slow (`slow_half_products`): there float32. The inputs are rounded to the head's dtype first
    (`head_product`), so float32 computes the same products with the same float32 accumulation and only skips the
    rounding of the output to bf16 / fp16."""
    if weight.dtype in (torch.bfloat16, torch.float16) and slow_half_products(weight.device):
        return torch.float32
    return weight.dtype


def head_product(states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """states [n, D] @ weight [V, D]^T in `product_dtype(weight)`, the states rounded to the head's dtype first: every
    LM-head product of the span KL (`weight` already in that dtype or converted here)."""
    dtype = product_dtype(weight)
    return states.to(weight.dtype).to(dtype) @ weight.to(dtype).T


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
class _Plan:
    """The span KL's constants (no gradient): both heads, the teacher's centres, how to chunk."""

    student_head: SharedHead
    teacher_head: SharedHead
    teacher_centres: torch.Tensor
    temperature: float
    divisor: int
    chunk: int


class _SpanKL(torch.autograd.Function):
    """L_kl (module docstring) as a function of the student's centres, head weight and head bias."""

    @staticmethod
    def forward(ctx, centres, weight, bias, plan: _Plan):
        wants_centres, wants_weight, wants_bias = ctx.needs_input_grad[:3]  # e.g. a frozen head under LoRA: no weight
        # Outside autocast: float32 throughout, whatever the caller's autocast (the teacher's product stays bf16).
        with torch.autocast(centres.device.type, enabled=False):
            student, teacher = plan.student_head, plan.teacher_head
            weight_rows = student.select(weight)
            bias_rows = student.select(bias)
            teacher_weight, teacher_bias = teacher.select(teacher.weight), teacher.select(teacher.bias)
            # The teacher's centres in its head's dtype, then the product's (converted once, not per chunk).
            teacher_centres = plan.teacher_centres.to(teacher_weight.dtype).to(product_dtype(teacher_weight))
            teacher_weight = teacher_weight.to(product_dtype(teacher_weight))
            grad_centres = torch.zeros_like(centres, dtype=torch.float32) if wants_centres else None
            grad_rows = torch.zeros(len(student.rows), weight.shape[1], device=centres.device) if wants_weight else None
            grad_bias_rows = torch.zeros(len(student.rows), device=centres.device) if wants_bias else None
            scale = 1.0 / (plan.temperature * plan.divisor)  # d L / d z^S = (q - p) / (tau D)
            total = torch.zeros((), dtype=torch.float32, device=centres.device)
            for first in range(0, centres.shape[0], plan.chunk):
                end = min(first + plan.chunk, centres.shape[0])
                log_q = torch.log_softmax(scaled_logits(head_product(centres[first:end], weight_rows), bias_rows,
                                                        plan.temperature), -1)
                log_p = torch.log_softmax(scaled_logits(head_product(teacher_centres[first:end], teacher_weight),
                                                        teacher_bias, plan.temperature), -1)
                p = log_p.exp()
                total += torch.dot(p.view(-1), log_p.sub_(log_q).view(-1))  # sum p (log p - log q)
                if not (wants_centres or wants_weight or wants_bias):
                    continue
                g = log_q.exp_().sub_(p).mul_(scale)  # [spans, V_shared], in log_q's storage
                if grad_centres is not None:
                    grad_centres[first:end] = g @ weight_rows.float()
                if grad_rows is not None:
                    grad_rows.addmm_(g.T, centres[first:end].float())
                if grad_bias_rows is not None:
                    grad_bias_rows += g.sum(0)
        ctx.save_for_backward(grad_centres, grad_rows, grad_bias_rows, student.rows)
        ctx.dtypes = (centres.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.vocab_size = weight.shape[0]
        return total / plan.divisor

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad_centres, grad_rows, grad_bias_rows, rows = ctx.saved_tensors
        centres_dtype, weight_dtype, bias_dtype = ctx.dtypes
        size = ctx.vocab_size
        return (None if grad_centres is None else (grad_centres * grad_output).to(centres_dtype),
                _scatter_rows(grad_rows, rows, size, grad_output, weight_dtype),
                _scatter_rows(grad_bias_rows, rows, size, grad_output, bias_dtype), None)


def _scatter_rows(grad_rows, rows, size: int, grad_output, dtype):
    """The gradient of a whole head tensor [V, ...] from that of its shared rows, times the incoming gradient;
    index_add_ sums the rows of repeated ids."""
    if grad_rows is None:
        return None
    full = torch.zeros(size, *grad_rows.shape[1:], dtype=torch.float32, device=grad_rows.device)
    return full.index_add_(0, rows, grad_rows).mul_(grad_output).to(dtype)


def span_kl(
    student_centres: torch.Tensor,
    student_head: SharedHead,
    teacher_centres: torch.Tensor,
    teacher_head: SharedHead,
    temperature: float,
    divisor: int,
    *,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """L_kl (module docstring) of N aligned spans: centres [N, D_side] per side, float32 scalar.

    Gradients reach the student's centres, head weight and bias; the teacher side is a constant.
    """
    if student_centres.shape[0] != teacher_centres.shape[0]:
        raise ValueError(f"span counts differ: student {student_centres.shape[0]}, teacher {teacher_centres.shape[0]}")
    if student_head.rows.shape[0] != teacher_head.rows.shape[0]:
        raise ValueError(
            f"head rows differ: student {student_head.rows.shape[0]}, teacher {teacher_head.rows.shape[0]}; both "
            "heads must be restricted to the same shared vocabulary"
        )
    if student_centres.shape[0] == 0:
        return (student_centres.sum() * 0.0).float()  # keeps the graph connected, value 0
    device = student_centres.device  # the shared ids index tensors there
    student_head = replace(student_head, rows=student_head.rows.to(device))
    plan = _Plan(student_head, teacher_head, teacher_centres.detach(), float(temperature), int(divisor), int(chunk))
    return _SpanKL.apply(student_centres, student_head.weight, student_head.bias, plan)
