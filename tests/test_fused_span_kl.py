"""`fused_span_kl.span_kl` equals the plain span KL (tests/sra_reference.py) in value and gradients, from the
centres and from the student's token logits, and a second backward (retain_graph) gives the same gradients again."""

import pytest
import torch
from sra_reference import head_function, plain_span_kl

from sra_distill.losses.fused_span_kl import SharedHead, SpanTokens, span_kl


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


# ---------------------------------------------------------------- student span logits from its token logits


def _tokens_case(seed=3):
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
    teacher = torch.randn(len(members), 4, generator=gen, dtype=torch.float64)
    t_weight = torch.randn(v, 4, generator=gen, dtype=torch.float64)
    return hidden, weight, tokens, rows, teacher, t_weight


def _centres(hidden, tokens):
    flat = hidden.reshape(-1, hidden.shape[-1])
    pooled = flat[tokens.positions] * tokens.weights.double()[:, None]
    return torch.zeros(tokens.num_spans, hidden.shape[-1], dtype=hidden.dtype).index_add(0, tokens.spans, pooled)


@pytest.mark.parametrize("with_ce", [True, False])
@pytest.mark.parametrize("chunk", [1, 2, 64])
@pytest.mark.parametrize("teacher_bias", [False, True])
def test_token_logits_match_plain_values_and_gradients(with_ce, chunk, teacher_bias):
    hidden, weight, tokens, rows, teacher, t_weight = _tokens_case()
    t_bias = torch.randn(30, dtype=torch.float64) if teacher_bias else None
    student_head, teacher_head = SharedHead(weight, None, rows), SharedHead(t_weight, t_bias, torch.arange(8) * 3)

    def other_use(logits):  # stands in for the CE, which also reads the logits
        return (logits.square().mean() * 0.3) if with_ce else 0.0

    logits = hidden @ weight.T
    expected = plain_span_kl(_centres(hidden, tokens), teacher, head_function(student_head),
                             head_function(teacher_head), 2.0, 2)
    expected_grads = torch.autograd.grad(expected * 1.7 + other_use(logits), (hidden, weight))
    logits = hidden @ weight.T
    got = span_kl(_centres(hidden, tokens), student_head, teacher, teacher_head, 2.0, 2, token_logits=logits,
                  tokens=tokens, chunk=chunk)
    got_grads = torch.autograd.grad(got * 1.7 + other_use(logits), (hidden, weight))
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-7)
    for a, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("from_tokens", [False, True])
def test_backward_twice_with_retain_graph_gives_the_gradients_twice(from_tokens):
    """Nothing is consumed by a backward: two of them through a retained graph accumulate exactly twice the plain
    gradients, with a second loss (the CE stand-in) reading the same logits."""
    hidden, weight, tokens, rows, teacher, t_weight = _tokens_case(seed=5)
    student_head, teacher_head = SharedHead(weight, None, rows), SharedHead(t_weight, None, torch.arange(8))
    logits = hidden @ weight.T
    expected = plain_span_kl(_centres(hidden, tokens), teacher, head_function(student_head),
                             head_function(teacher_head), 2.0, 2) + logits.square().mean()
    expected_grads = torch.autograd.grad(expected, (hidden, weight))

    logits = hidden @ weight.T
    extra = {"token_logits": logits, "tokens": tokens} if from_tokens else {}
    loss = span_kl(_centres(hidden, tokens), student_head, teacher, teacher_head, 2.0, 2, chunk=2, **extra)
    loss = loss + logits.square().mean()
    loss.backward(retain_graph=True)
    once = (hidden.grad.clone(), weight.grad.clone())
    loss.backward()
    for first, total, e in zip(once, (hidden.grad, weight.grad), expected_grads):
        torch.testing.assert_close(first, e, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(total, 2 * e, rtol=1e-4, atol=1e-6)


def test_token_logits_without_grad_and_errors():
    hidden, weight, tokens, rows, teacher, t_weight = _tokens_case(seed=4)
    student_head, teacher_head = SharedHead(weight, None, rows), SharedHead(t_weight, None, torch.arange(8))
    expected = plain_span_kl(_centres(hidden, tokens), teacher, head_function(student_head),
                             head_function(teacher_head), 2.0, 2)
    with torch.no_grad():  # value only: nothing kept for a backward
        value = span_kl(_centres(hidden, tokens), student_head, teacher, teacher_head, 2.0, 2,
                        token_logits=hidden @ weight.T, tokens=tokens)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    centres, logits = _centres(hidden, tokens), hidden @ weight.T
    with pytest.raises(ValueError, match="together"):
        span_kl(centres, student_head, teacher, teacher_head, 2.0, 2, token_logits=logits)
    with pytest.raises(ValueError, match="bias-free"):
        span_kl(centres, SharedHead(weight, torch.zeros(30), rows), teacher, teacher_head, 2.0, 2,
                token_logits=logits, tokens=tokens)
    with pytest.raises(ValueError, match="tokens describe"):
        span_kl(centres[:3], student_head, teacher[:3], teacher_head, 2.0, 2, token_logits=logits, tokens=tokens)
