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

from dataclasses import dataclass

import torch

DEFAULT_CHUNK = 256  # spans per chunk: 256 x 37k shared ids x 4 bytes = 38 MB per temporary
# The reused-logits form runs next to the CE's [B, T, V] tensors (forward) and gradient (hook): smaller chunks keep
# its few temporaries at ~10 MB each.
REUSED_CHUNK = 64


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


# ---------------------------------------------------------------------------------------------------------------
# Reusing the student's token logits (bias-free head, spans pooled from the head's input).
#
# With z_t = h_t W^T the student's token logits (the ones its CE already computed) and C_k = sum_{t in k} a_t h_t
# a span's centre (a_t = m_t / max(M_k, 1e-5), or 1 / |k| for mean pooling), linearity gives
#
#     z^S_k = C_k W_rows^T = sum_{t in k} a_t z_t[rows]          (one token: z^S_k = a_t z_t[rows])
#
# so the student's span logits need no product with the head at all, and the KL's gradient d L / d z_t[rows] =
# a_t (q_k - p_k) / (tau B) joins the CE's gradient on the same logits: the head's backward products, which the CE
# runs anyway, carry both. Only the teacher's product over the spans remains.
#
# How the gradient joins without a second [B, T, V] buffer: the autograd function hands back a zero-stride zero
# gradient for the logits (autograd then accumulates the CE's gradient in place, no allocation), and a hook on the
# logits tensor, which autograd runs once every gradient for the logits has arrived, adds the KL's part in place
# chunk by chunk. The forward keeps only each span's two log-sum-exps; the hook computes the teacher's span logits
# again (one more teacher product, no [spans, V_shared] tensor held between forward and backward), or reads them
# kept from the forward (`keep_teacher_logits`: [spans, V_shared] in the teacher's dtype, no second product).


@dataclass(frozen=True)
class SpanTokens:
    """Which student tokens make up which span, and with which pooling weight.

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
        return [(spans[i], spans[i + 1], bounds[i], bounds[i + 1]) for i in range(len(spans) - 1) if spans[i + 1] > spans[i]]


def _reused_student_logits(flat_logits, tokens: SpanTokens, rows, bounds, temperature) -> torch.Tensor:
    """z^S / tau for spans [first, end): the pooled token logits, float32 [spans, V_shared]."""
    first, end, token_first, token_end = bounds
    index = (tokens.positions[token_first:token_end, None], rows[None, :])
    picked = flat_logits[index].float().mul_(tokens.weights[token_first:token_end, None] / temperature)
    if token_end - token_first == end - first:  # one token per span: nothing to pool
        return picked
    pooled = torch.zeros(end - first, rows.shape[0], dtype=torch.float32, device=picked.device)
    return pooled.index_add_(0, tokens.spans[token_first:token_end] - first, picked)


def _teacher_logits(raw, bias, temperature) -> torch.Tensor:
    """z^T / tau, float32, from the teacher's product in its own dtype (as `_logits`)."""
    out = raw.float()
    if bias is not None:
        out += bias.float()
    return out.mul_(1.0 / temperature)


class _GradientHook:
    """Adds the span KL's gradient into the logits' gradient once it is complete (see the section comment)."""

    def __init__(self, logits, tokens, rows, rows_unique, teacher_states, teacher_weight, teacher_bias, temperature,
                 batch_size, chunk, keep_teacher_logits):
        # A detached alias: holding `logits` itself would make a cycle (logits -> its hook -> logits) that keeps a
        # [B, T, V] tensor alive until Python's cycle collector runs.
        self.logits = logits.detach()
        self.tokens, self.rows, self.rows_unique = tokens, rows, rows_unique
        self.teacher_states, self.teacher_weight, self.teacher_bias = teacher_states, teacher_weight, teacher_bias
        self.temperature, self.batch_size, self.chunk = temperature, batch_size, chunk
        self.keep_teacher_logits = keep_teacher_logits
        self.teacher_raw: torch.Tensor | None = None  # [N, V_shared] teacher product, kept by the forward (if asked)
        self.log_norms: tuple[torch.Tensor, torch.Tensor] | None = None  # per span logsumexp of z^S/tau, z^T/tau
        self.grad_output: torch.Tensor | None = None  # set by the autograd function's backward
        self.spent = False

    def teacher_product(self, first: int, end: int) -> torch.Tensor:
        if self.teacher_raw is not None:
            return self.teacher_raw[first:end]
        return self.teacher_states[first:end].to(self.teacher_weight.dtype) @ self.teacher_weight.T

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        if self.grad_output is None:  # this backward does not go through the span KL
            return grad
        if self.spent:
            raise RuntimeError("the reused-logits span KL was back-propagated twice; retain_graph is not supported")
        if not grad.is_contiguous():  # e.g. the zero-stride zeros alone, when nothing else uses the logits
            grad = grad.contiguous()
        flat_grad = grad.view(-1, grad.shape[-1])
        flat_logits = self.logits.reshape(-1, self.logits.shape[-1])
        coefficient = self.grad_output.float() / self.batch_size  # d(z/tau)/dz = 1/tau is in the token weights
        tokens, rows = self.tokens, self.rows
        student_norm, teacher_norm = self.log_norms
        scale = tokens.weights * coefficient  # per token: a_t * grad_output / B (the 1/tau below)
        for bounds in tokens.chunks(self.chunk):
            first, end, token_first, token_end = bounds
            q = _reused_student_logits(flat_logits, tokens, rows, bounds, self.temperature)
            q = q.sub_(student_norm[first:end, None]).exp_()
            p = _teacher_logits(self.teacher_product(first, end), self.teacher_bias, self.temperature)
            g = q.sub_(p.sub_(teacher_norm[first:end, None]).exp_())  # d L / d(z^S_k / tau) * B
            per_token = g[tokens.spans[token_first:token_end] - first] if token_end - token_first != end - first else g
            per_token = per_token.mul_(scale[token_first:token_end, None] / self.temperature).to(grad.dtype)
            index = (tokens.positions[token_first:token_end, None], rows[None, :])
            if self.rows_unique:  # each (token, row) once: gather-add-put, no sort (CUDA sorts for accumulate=True)
                flat_grad.index_put_(index, flat_grad[index].add_(per_token))
            else:
                flat_grad.index_put_(index, per_token, accumulate=True)
        self.teacher_raw, self.log_norms, self.grad_output, self.spent = None, None, None, True
        return grad


class _ReusedLogitsSpanKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, rows, teacher_states, teacher_weight, teacher_bias, temperature, batch_size,
                chunk, hook):
        flat_logits = logits.detach().reshape(-1, logits.shape[-1])
        keep_raw = hook is not None and hook.keep_teacher_logits
        raw_all = None
        student_norm = torch.empty(tokens.num_spans, dtype=torch.float32, device=logits.device)
        teacher_norm = torch.empty_like(student_norm)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for bounds in tokens.chunks(chunk):
            first, end = bounds[0], bounds[1]
            zs = _reused_student_logits(flat_logits, tokens, rows, bounds, temperature)
            raw = teacher_states[first:end].to(teacher_weight.dtype) @ teacher_weight.T
            if keep_raw:
                if raw_all is None:
                    raw_all = torch.empty(tokens.num_spans, raw.shape[1], dtype=raw.dtype, device=raw.device)
                raw_all[first:end] = raw
            zt = _teacher_logits(raw, teacher_bias, temperature)
            torch.logsumexp(zs, -1, out=student_norm[first:end])
            torch.logsumexp(zt, -1, out=teacher_norm[first:end])
            # KL_k = sum_v p_v (z^T_v - z^S_v) / tau - lse^T_k + lse^S_k (sum_v p_v = 1): no log-softmax tensors.
            difference = torch.sub(zt, zs, out=zs)
            p = zt.sub_(teacher_norm[first:end, None]).exp_()
            total += torch.dot(p.view(-1), difference.view(-1))
        total += (student_norm - teacher_norm).sum()
        if hook is not None:
            hook.teacher_raw, hook.log_norms = raw_all, (student_norm, teacher_norm)
        ctx.hook = hook
        ctx.logits_meta = (logits.shape, logits.dtype, logits.device)
        return total / batch_size

    @staticmethod
    def backward(ctx, grad_output):
        shape, dtype, device = ctx.logits_meta
        if ctx.hook is not None:
            ctx.hook.grad_output = grad_output
        # A zero-stride zero: costs nothing, and lets autograd accumulate the CE's gradient in place.
        zero = torch.zeros((), dtype=dtype, device=device).expand(shape)
        return zero, None, None, None, None, None, None, None, None, None


def reused_logits_span_kl(
    logits: torch.Tensor,
    tokens: SpanTokens,
    rows: torch.Tensor,
    teacher_states: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    temperature: float,
    batch_size: int,
    rows_unique: bool = False,
    chunk: int = REUSED_CHUNK,
    keep_teacher_logits: bool = False,
) -> torch.Tensor:
    """L_kl from the student's token logits (see the section comment above): same value and gradients as
    `fused_span_kl` on the pooled centres with a bias-free student head.

    logits [B, T, V]: the student's token logits, z_t = h_t W^T exactly (no bias, no soft-capping); tokens: which
    tokens pool into which span; rows [V_shared]: the student's shared ids; teacher_states [N, D_T] and the
    teacher's shared head rows [V_shared, D_T] (+ bias) as in `fused_span_kl`. rows_unique: no id repeats in `rows`
    (a faster gradient scatter). keep_teacher_logits: keep the teacher's [N, V_shared] product from the forward pass
    for the backward (memory) instead of computing it again there (time). The gradient is added in place into the
    gradient that reaches `logits`, which must therefore be a buffer of its own (as autograd's accumulated gradient
    of a tensor is).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if teacher_states.shape[0] != tokens.num_spans:
        raise ValueError(f"span counts differ: student {tokens.num_spans}, teacher {teacher_states.shape[0]}")
    if rows.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"head rows differ: student {rows.shape[0]}, teacher {teacher_weight.shape[0]}; both heads must be "
            "restricted to the same shared vocabulary"
        )
    if tokens.num_spans == 0:
        return (logits.sum() * 0.0).float()  # keeps the graph connected, value 0
    teacher_states, teacher_weight = teacher_states.detach(), teacher_weight.detach()
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    hook = None
    if logits.requires_grad and torch.is_grad_enabled():
        hook = _GradientHook(logits, tokens, rows, rows_unique, teacher_states, teacher_weight, teacher_bias,
                             float(temperature), int(batch_size), int(chunk), keep_teacher_logits)
    out = _ReusedLogitsSpanKL.apply(
        logits, tokens, rows, teacher_states, teacher_weight, teacher_bias, float(temperature), int(batch_size),
        int(chunk), hook,
    )
    if hook is not None:
        logits.register_hook(hook)
    return out
