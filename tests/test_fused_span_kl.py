"""The fused, chunked span KL equals the plain `sra.span_kl` in value and gradients."""

import pytest
import torch

from sra_distill.losses.fused_span_kl import fused_span_kl
from sra_distill.losses.sra import span_kl


def plain(student_states, student_weight, student_bias, teacher_states, teacher_weight, teacher_bias, tau, batch):
    valid = torch.ones(student_states.shape[0], dtype=torch.bool)

    def head(weight, bias):
        return lambda x: x.to(weight.dtype) @ weight.T + (0 if bias is None else bias)

    return span_kl(student_states, teacher_states, valid, head(student_weight, student_bias),
                   head(teacher_weight, teacher_bias), tau, batch)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_fused_matches_plain_values_and_gradients(with_bias, chunk):
    torch.manual_seed(0)
    n, v, ds, dt, tau, batch = 7, 40, 6, 10, 2.0, 3
    s = torch.randn(n, ds, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, ds, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, dtype=torch.float64, requires_grad=True) if with_bias else None
    t, wt = torch.randn(n, dt, dtype=torch.float64), torch.randn(v, dt, dtype=torch.float64)
    bt = torch.randn(v, dtype=torch.float64) if with_bias else None
    inputs = [s, w] + ([b] if with_bias else [])

    expected = plain(s, w, b, t, wt, bt, tau, batch)
    expected_grads = torch.autograd.grad(expected * 1.7, inputs)
    got = fused_span_kl(s, w, b, t, wt, bt, tau, batch, chunk=chunk)
    got_grads = torch.autograd.grad(got * 1.7, inputs)
    # The fused path computes in float32.
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-6)
    for a, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(a.double(), e.double(), rtol=1e-4, atol=1e-6)


def test_identical_models_give_zero_and_no_spans_give_zero_with_a_graph():
    torch.manual_seed(1)
    s, w = torch.randn(5, 4, requires_grad=True), torch.randn(30, 4, requires_grad=True)
    assert fused_span_kl(s, w, None, s.detach(), w.detach(), None, 2.0, 2).item() == pytest.approx(0.0, abs=1e-6)
    empty = fused_span_kl(s[:0], w, None, s[:0].detach(), w.detach(), None, 2.0, 2)
    assert empty.item() == 0.0 and empty.requires_grad


def test_bf16_teacher_head_stays_bf16_and_mismatched_rows_are_refused():
    torch.manual_seed(2)
    s, w = torch.randn(4, 3, requires_grad=True), torch.randn(20, 3, requires_grad=True)
    t, wt = torch.randn(4, 8), torch.randn(20, 8).to(torch.bfloat16)
    out = fused_span_kl(s, w, None, t, wt, None, 2.0, 1)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    out.backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()
    with pytest.raises(ValueError, match="head rows differ"):
        fused_span_kl(s, w, None, t, wt[:10], None, 2.0, 1)


# ---------------------------------------------------------------- reusing the student's token logits

from sra_distill.losses.fused_span_kl import SpanTokens, reused_logits_span_kl  # noqa: E402


def _spans_case(seed=3):
    """Two samples of 6 tokens; spans of 1, 2 and 3 tokens, tokens outside spans, pooling weights summing to <= 1."""
    gen = torch.Generator().manual_seed(seed)
    b, t, d, v = 2, 6, 5, 30
    hidden = torch.randn(b, t, d, generator=gen, dtype=torch.float64).requires_grad_(True)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64).requires_grad_(True)
    # span -> (sample, token positions); span 4 is one token with a tiny weight (a mass below the 1e-5 floor)
    members = [(0, [0]), (0, [1, 2]), (0, [4]), (1, [0, 1, 2]), (1, [3]), (1, [5])]
    positions, spans, weights = [], [], []
    for k, (sample, tokens) in enumerate(members):
        raw = torch.rand(len(tokens), generator=gen, dtype=torch.float64) + 0.1
        share = raw / raw.sum() * (3e-6 / 1e-5 if k == 4 else 1.0)
        for token, a in zip(tokens, share):
            positions.append(sample * t + token)
            spans.append(k)
            weights.append(float(a))
    tokens = SpanTokens(torch.tensor(positions), torch.tensor(spans), torch.tensor(weights, dtype=torch.float32),
                        len(members))
    rows = torch.tensor([0, 3, 4, 7, 11, 12, 20, 29])
    teacher_states = torch.randn(len(members), 4, generator=gen, dtype=torch.float64)
    teacher_weight = torch.randn(len(rows), 4, generator=gen, dtype=torch.float64)
    return hidden, weight, tokens, rows, teacher_states, teacher_weight


def _centres(hidden, tokens):
    flat = hidden.reshape(-1, hidden.shape[-1])
    pooled = flat[tokens.positions] * tokens.weights.double()[:, None]
    return torch.zeros(tokens.num_spans, hidden.shape[-1], dtype=hidden.dtype).index_add(0, tokens.spans, pooled)


@pytest.mark.parametrize("with_ce", [True, False])
@pytest.mark.parametrize("chunk", [1, 2, 64])
@pytest.mark.parametrize("teacher_bias", [False, True])
@pytest.mark.parametrize("keep_teacher_logits", [False, True])
def test_reused_logits_match_fused_values_and_gradients(with_ce, chunk, teacher_bias, keep_teacher_logits):
    hidden, weight, tokens, rows, t_states, t_weight = _spans_case()
    t_bias = torch.randn(len(rows), dtype=torch.float64) if teacher_bias else None
    tau, batch = 2.0, 2

    def other_use(logits):  # stands in for the CE, which also reads the logits
        return (logits.square().mean() * 0.3) if with_ce else 0.0

    logits = hidden @ weight.T
    expected = fused_span_kl(_centres(hidden, tokens), weight[rows], None, t_states, t_weight, t_bias, tau, batch)
    expected_grads = torch.autograd.grad(expected * 1.7 + other_use(logits), (hidden, weight))

    logits = hidden @ weight.T
    got = reused_logits_span_kl(logits, tokens, rows, t_states, t_weight, t_bias, tau, batch, rows_unique=True,
                                chunk=chunk, keep_teacher_logits=keep_teacher_logits)
    got_grads = torch.autograd.grad(got * 1.7 + other_use(logits), (hidden, weight))
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-7)
    for a, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_reused_logits_repeated_rows_no_grad_and_errors():
    hidden, weight, tokens, rows, t_states, t_weight = _spans_case(seed=4)
    rows = torch.tensor([0, 3, 3, 7, 11, 12, 20, 3])  # repeated ids: the scatter must accumulate
    logits = hidden @ weight.T
    expected = fused_span_kl(_centres(hidden, tokens), weight[rows], None, t_states, t_weight, None, 2.0, 2)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    logits = hidden @ weight.T
    got = reused_logits_span_kl(logits, tokens, rows, t_states, t_weight, None, 2.0, 2, rows_unique=False)
    for a, e in zip(torch.autograd.grad(got, (hidden, weight)), expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # value only: nothing kept for a backward
        value = reused_logits_span_kl(hidden @ weight.T, tokens, rows, t_states, t_weight, None, 2.0, 2)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    logits = hidden @ weight.T
    twice = reused_logits_span_kl(logits, tokens, rows, t_states, t_weight, None, 2.0, 2)
    (twice + logits.sum()).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        twice.backward()
    with pytest.raises(ValueError, match="span counts differ"):
        reused_logits_span_kl(logits.detach(), tokens, rows, t_states[:2], t_weight, None, 2.0, 2)
    with pytest.raises(ValueError, match="head rows differ"):
        reused_logits_span_kl(logits.detach(), tokens, rows[:3], t_states, t_weight, None, 2.0, 2)
