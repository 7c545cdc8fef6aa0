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
