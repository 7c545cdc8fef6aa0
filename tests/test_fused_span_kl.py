"""`fused_span_kl.span_kl` equals the plain span KL (tests/sra_reference.py) in value and gradients, from the
centres (from the token logits, with the CE: tests/test_logit_losses.py)."""

import pytest
import torch
from sra_reference import head_function, plain_span_kl

from sra_distill.losses.fused_span_kl import SharedHead, span_kl


def _heads(seed, n=7, v=40, ds=6, dt=10, rows=(0, 3, 4, 7, 11, 12, 20, 29, 33, 39), with_bias=False):
    """Student/teacher centres and heads in float64, the student's differentiable; shared rows `rows`."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n, ds, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, ds, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=gen, dtype=torch.float64, requires_grad=True) if with_bias else None
    teacher = torch.randn(n, dt, generator=gen, dtype=torch.float64)
    t_weight = torch.randn(v, dt, generator=gen, dtype=torch.float64)
    t_bias = torch.randn(v, generator=gen, dtype=torch.float64) if with_bias else None
    rows = torch.tensor(rows)
    t_rows = torch.randperm(v, generator=gen)[: len(rows)]
    return centres, SharedHead(weight, bias, rows), teacher, SharedHead(t_weight, t_bias, t_rows)


def _differentiable(head: SharedHead) -> list[torch.Tensor]:
    return [head.weight] + ([head.bias] if head.bias is not None else [])


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_matches_plain_values_and_gradients(with_bias, chunk):
    centres, student, teacher, teacher_head = _heads(0, with_bias=with_bias)
    inputs = [centres, *_differentiable(student)]
    expected = plain_span_kl(centres, teacher, head_function(student), head_function(teacher_head), 2.0, 3)
    expected_grads = torch.autograd.grad(expected * 1.7, inputs)
    got = span_kl(centres, student, teacher, teacher_head, 2.0, 3, chunk=chunk)
    got_grads = torch.autograd.grad(got * 1.7, inputs)
    assert got.dtype == torch.float32 and expected.item() > 0  # the fused path computes in float32
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-6)
    for a, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_repeated_shared_ids_sum_their_gradients():
    centres, student, teacher, teacher_head = _heads(1, rows=(0, 3, 3, 7, 11, 12, 20, 3, 33, 39))
    inputs = [centres, student.weight]
    expected = plain_span_kl(centres, teacher, head_function(student), head_function(teacher_head), 2.0, 2)
    got = span_kl(centres, student, teacher, teacher_head, 2.0, 2, chunk=2)
    for a, e in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_identical_models_give_zero_and_no_spans_give_zero_with_a_graph():
    centres, student, _, _ = _heads(2)
    same = SharedHead(student.weight.detach(), None, student.rows)
    assert span_kl(centres, student, centres.detach(), same, 2.0, 2).item() == pytest.approx(0.0, abs=1e-6)
    empty = span_kl(centres[:0], student, centres[:0].detach(), same, 2.0, 2)
    assert empty.item() == 0.0 and empty.requires_grad


def test_bf16_teacher_head_stays_bf16_and_mismatches_are_refused():
    centres, student, teacher, teacher_head = _heads(3)
    centres32 = centres.detach().float().requires_grad_(True)
    weight32 = student.weight.detach().float().requires_grad_(True)
    bf16_teacher = SharedHead(teacher_head.weight.bfloat16(), None, teacher_head.rows)
    out = span_kl(centres32, SharedHead(weight32, None, student.rows), teacher.float(), bf16_teacher, 2.0, 1)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    out.backward()
    assert weight32.grad.dtype == torch.float32 and torch.isfinite(weight32.grad).all()
    with pytest.raises(ValueError, match="head rows differ"):
        span_kl(centres, student, teacher, SharedHead(teacher_head.weight, None, teacher_head.rows[:3]), 2.0, 1)
    with pytest.raises(ValueError, match="span counts differ"):
        span_kl(centres, student, teacher[:2], teacher_head, 2.0, 1)



def test_a_bf16_teacher_head_computes_in_float32_on_a_cpu_without_a_fast_bf16_product(monkeypatch):
    """As `ce_and_span_kl`'s (tests/test_logit_losses.py): without AVX-512 the bf16 head's product is float32 from the
    same bf16 values; with it, bf16."""
    centres, student, teacher, teacher_head = _heads(4)
    centres32, student32 = centres.detach().float(), SharedHead(student.weight.detach().float(), None, student.rows)
    teacher = teacher.float().bfloat16().float()
    bf16 = SharedHead(teacher_head.weight.bfloat16(), None, teacher_head.rows)
    same_values = span_kl(centres32, student32, teacher, SharedHead(bf16.weight.float(), None, bf16.rows), 2.0, 1)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    torch.testing.assert_close(span_kl(centres32, student32, teacher, bf16, 2.0, 1), same_values, rtol=1e-6, atol=0)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    torch.testing.assert_close(span_kl(centres32, student32, teacher, bf16, 2.0, 1), same_values, rtol=1e-2, atol=0)
