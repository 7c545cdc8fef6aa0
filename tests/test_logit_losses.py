"""`logit_losses`: the written-out CE equals `F.cross_entropy` on the shifted logits, and `ce_and_span_kl` equals
that CE plus the plain span KL from the centres (tests/sra_reference.py), in values and gradients, whatever the
chunking; a second backward through a retained graph gives the gradients twice; no_grad and bad inputs."""

import pytest
import torch
import torch.nn.functional as F
from sra_reference import head_function, plain_span_kl

from sra_distill.data.batch import IGNORE_INDEX
from sra_distill.losses import logit_losses
from sra_distill.losses.fused_span_kl import SharedHead, product_dtype
from sra_distill.losses.logit_losses import SpanTokens, causal_lm_ce, ce_and_span_kl


def plain_ce(logits, labels):
    """The CE as every causal-LM trainer writes it."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def _labels(b=2, t=6, v=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[0, :2] = IGNORE_INDEX  # a prompt
    labels[1, 4:] = IGNORE_INDEX  # padding
    return labels


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
    rows = torch.tensor([0, 3, 4, 7, 11, 12, 20, 3])  # student id 3 twice: its gradients add up
    teacher = torch.randn(len(members), 4, generator=gen, dtype=torch.float64)
    t_weight = torch.randn(v, 4, generator=gen, dtype=torch.float64)
    return hidden, weight, tokens, rows, teacher, t_weight


def _centres(hidden, tokens):
    flat = hidden.reshape(-1, hidden.shape[-1])
    pooled = flat[tokens.positions] * tokens.weights.double()[:, None]
    return torch.zeros(tokens.num_spans, hidden.shape[-1], dtype=hidden.dtype).index_add(0, tokens.spans, pooled)


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 256])
def test_ce_matches_cross_entropy_values_and_gradients(rows_per_chunk, monkeypatch):
    monkeypatch.setattr(logit_losses, "ROWS_PER_CHUNK", rows_per_chunk)
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 6, 30, generator=gen) * 3).requires_grad_(True)
    labels = _labels()
    got, expected = causal_lm_ce(logits, labels), plain_ce(logits, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(got * 0.7, logits)
    (expected_grad,) = torch.autograd.grad(expected * 0.7, logits)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
    assert not grad[1, 3:].any() and not grad[:, -1].any()  # unlabelled next tokens and the last row: no gradient


def test_ce_of_bf16_logits_and_of_no_labelled_token():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 30, generator=gen).bfloat16().requires_grad_(True)
    labels = _labels()
    got = causal_lm_ce(logits, labels)
    (grad,) = torch.autograd.grad(got, logits)
    assert got.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, plain_ce(logits.float(), labels), rtol=1e-6, atol=1e-6)
    none = torch.full_like(labels, IGNORE_INDEX)
    assert torch.isnan(causal_lm_ce(logits, none)) and torch.isnan(plain_ce(logits, none))  # as F.cross_entropy


# The teacher's shared ids: under half its head (their columns computed a block of rows at a time), or most of it
# (its shared rows gathered once per call; the whole-product path without buffers is tested on its own below).
TEACHER_ROWS = {"few": torch.arange(8) * 3, "most": torch.tensor([0, 2, 3, 5, 6, 8, 9, 11])}


@pytest.mark.parametrize("chunk", [1, 2, 64])
@pytest.mark.parametrize("teacher_bias", [False, True])
@pytest.mark.parametrize("pass_spans", [None, 3])  # None: one pass over the (small) teacher head; 3: several passes
@pytest.mark.parametrize("teacher_rows", ["few", "most"])
def test_ce_and_span_kl_match_the_ce_plus_the_plain_span_kl(chunk, teacher_bias, pass_spans, teacher_rows,
                                                            monkeypatch):
    monkeypatch.setattr(logit_losses, "ROWS_PER_CHUNK", 5)
    if pass_spans is not None:
        monkeypatch.setattr(logit_losses, "teacher_pass_spans", lambda weight, shared: pass_spans)
    hidden, weight, tokens, rows, teacher, t_weight = _tokens_case()
    if teacher_rows == "most":
        t_weight = t_weight[:12]
    t_bias = torch.randn(t_weight.shape[0], dtype=torch.float64) if teacher_bias else None
    student_head = SharedHead(weight, None, rows)
    teacher_head = SharedHead(t_weight, t_bias, TEACHER_ROWS[teacher_rows])
    labels = _labels()

    expected_kl = plain_span_kl(_centres(hidden, tokens), teacher, head_function(student_head),
                                head_function(teacher_head), 2.0, 2)
    expected_ce = plain_ce(hidden @ weight.T, labels)
    expected_grads = torch.autograd.grad(expected_kl * 1.7 + expected_ce * 0.4, (hidden, weight), retain_graph=True)
    ce, kl = ce_and_span_kl(hidden @ weight.T, labels, tokens, rows, teacher, teacher_head, 2.0, 2, chunk=chunk)
    got_grads = torch.autograd.grad(kl * 1.7 + ce * 0.4, (hidden, weight))
    assert kl.item() > 0
    torch.testing.assert_close(kl.double(), expected_kl.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ce.double(), expected_ce.double(), rtol=1e-6, atol=1e-7)
    for a, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)
    # Either output alone: the other one's gradient is zero, not left out.
    (kl_only,) = torch.autograd.grad(ce_and_span_kl(hidden @ weight.T, labels, tokens, rows, teacher, teacher_head,
                                                    2.0, 2)[1], hidden)
    (expected_kl_only,) = torch.autograd.grad(expected_kl, hidden)
    torch.testing.assert_close(kl_only, expected_kl_only, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("teacher_rows", ["few", "most"])
def test_float32_logits_and_a_bf16_teacher_head(teacher_rows, monkeypatch):
    """The engine's dtypes (float32 student logits, reused buffers; a bf16 teacher head, its products in bf16) against
    the plain span KL of the same bf16-rounded teacher, over several passes."""
    monkeypatch.setattr(logit_losses, "teacher_pass_spans", lambda weight, shared: 2)
    hidden, weight, tokens, rows, teacher, t_weight = _tokens_case(seed=5)
    hidden, weight = hidden.float().detach().requires_grad_(True), weight.float().detach().requires_grad_(True)
    t_weight = (t_weight if teacher_rows == "few" else t_weight[:12]).bfloat16()
    teacher_head = SharedHead(t_weight, None, TEACHER_ROWS[teacher_rows])
    rounded_head = SharedHead(t_weight.double(), None, TEACHER_ROWS[teacher_rows])
    labels = _labels()
    expected_kl = plain_span_kl(_centres(hidden.double(), tokens), teacher.bfloat16().double(),
                                head_function(SharedHead(weight.double(), None, rows)), head_function(rounded_head),
                                2.0, 2)
    ce, kl = ce_and_span_kl(hidden @ weight.T, labels, tokens, rows, teacher, teacher_head, 2.0, 2, chunk=2)
    # The teacher's logits round to bf16: a loose tolerance, still far below what a wrong column or span would move.
    torch.testing.assert_close(kl.double(), expected_kl.double(), rtol=2e-2, atol=1e-4)
    (grad,) = torch.autograd.grad(kl, hidden)
    (expected_grad,) = torch.autograd.grad(expected_kl, hidden)
    torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=5e-2, atol=1e-4)


def test_chunks_are_runs_of_consecutive_rows_cut_at_the_teacher_passes():
    """Spans 0..5 over rows 0, 1-2, 4, 5, 6+8 (a span whose own tokens are not consecutive), 9: a chunk ends where the
    rows jump before a span, at `chunk` spans, and before a multiple of `every`; its first row is None only when a
    span inside it is not consecutive."""
    tokens = SpanTokens(torch.tensor([0, 1, 2, 4, 5, 6, 8, 9]), torch.tensor([0, 1, 1, 2, 3, 4, 4, 5]),
                        torch.ones(8), 6)
    assert tokens.chunks(64) == [(0, 2, 0, 3, 0), (2, 6, 3, 8, None)]
    assert tokens.chunks(2) == [(0, 2, 0, 3, 0), (2, 4, 3, 5, 4), (4, 6, 5, 8, None)]
    assert tokens.chunks(64, every=3) == [(0, 2, 0, 3, 0), (2, 3, 3, 4, 4), (3, 6, 4, 8, None)]
    none = SpanTokens(tokens.positions[:0], tokens.spans[:0], tokens.weights[:0], 0)
    assert none.chunks(64) == []
    chunks = tokens.chunks(2, every=3)
    assert logit_losses._teacher_passes(chunks, 3) == [chunks[:2], chunks[2:]]


@pytest.mark.parametrize("chunk", [1, 64])
def test_a_span_whose_tokens_are_not_consecutive_rows(chunk):
    """Pooling reads and writes gathered rows when a chunk's rows are not one slice: same values and gradients."""
    hidden, weight, tokens, rows, teacher, t_weight = _tokens_case(seed=6)
    # Span 3's tokens 6, 7, 8 become 6, 8, 9 (row 7 outside spans); spans 4 and 5 move to rows 10 and 11.
    positions = tokens.positions.clone()
    positions[tokens.spans == 3] = torch.tensor([6, 8, 9])
    positions[tokens.spans == 4], positions[tokens.spans == 5] = 10, 11
    tokens = SpanTokens(positions, tokens.spans, tokens.weights, tokens.num_spans)
    assert any(row is None for *_, row in tokens.chunks(chunk))
    teacher_head = SharedHead(t_weight, None, TEACHER_ROWS["few"])
    labels = _labels()
    expected = plain_span_kl(_centres(hidden, tokens), teacher, head_function(SharedHead(weight, None, rows)),
                             head_function(teacher_head), 2.0, 2)
    _, kl = ce_and_span_kl(hidden @ weight.T, labels, tokens, rows, teacher, teacher_head, 2.0, 2, chunk=chunk)
    torch.testing.assert_close(kl.double(), expected.double(), rtol=1e-5, atol=1e-7)
    got, want = (torch.autograd.grad(value, (hidden, weight)) for value in (kl, expected))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_the_kl_value_stays_accurate_over_millions_of_float32_terms(monkeypatch):
    """Chunks inside a pass start off a 64-byte boundary (an odd number of shared ids): one float32 `torch.dot` over
    such a chunk's ~10^6 terms was off by up to ~1e-3 of the value (2.4e-4 here); per-span dots keep it to float32
    rounding."""
    monkeypatch.setattr(logit_losses, "teacher_pass_spans", lambda weight, shared: 96)
    gen = torch.Generator().manual_seed(7)
    spans, vocab, shared = 90, 24001, 20001
    logits = torch.randn(1, spans + 1, vocab, generator=gen) * 4
    rows = torch.randperm(vocab, generator=gen)[:shared]
    t_weight = torch.randn(shared, 16, generator=gen)
    teacher = torch.randn(spans, 16, generator=gen) * 2
    tokens = SpanTokens(torch.arange(spans), torch.arange(spans), torch.ones(spans), spans)
    labels = torch.randint(0, vocab, (1, spans + 1), generator=gen)
    _, kl = ce_and_span_kl(logits, labels, tokens, rows, teacher, SharedHead(t_weight, None, torch.arange(shared)),
                           2.0, 1, chunk=31)
    log_q = torch.log_softmax(logits[0, :spans, rows].double() / 2.0, -1)
    log_p = torch.log_softmax((teacher.double() @ t_weight.double().T) / 2.0, -1)
    expected = (log_p.exp() * (log_p - log_q)).sum()
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=0)


def test_shared_head_product_reads_the_shared_rows_in_blocks():
    weight, states = torch.randn(3000, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    for rows in (torch.randperm(3000)[:1400], torch.randperm(3000)[:2500]):  # blocks of shared rows; whole product
        expected = states @ weight[rows].T
        torch.testing.assert_close(logit_losses.shared_head_product(states, weight, rows), expected)
        bf16 = logit_losses.shared_head_product(states.float(), weight.bfloat16(), rows)
        assert bf16.dtype == product_dtype(weight.bfloat16())  # the head's dtype, or float32 on a CPU without bf16
        torch.testing.assert_close(bf16.double(), expected, rtol=0.05, atol=0.1)
    weight = torch.randn(9000, 4, dtype=torch.float64)
    rows = torch.randperm(9000)[:3000]  # under half the head, more than one block of 1024 rows
    expected = states[:, :4] @ weight[rows].T
    torch.testing.assert_close(logit_losses.shared_head_product(states[:, :4], weight, rows), expected)


def test_teacher_passes_group_whole_student_chunks_and_grow_with_the_head():
    chunks = [(0, 2, 0, 3), (2, 4, 3, 5), (4, 6, 5, 9), (6, 7, 9, 10)]
    assert logit_losses._teacher_passes(chunks, 4) == [chunks[:2], chunks[2:]]
    assert logit_losses._teacher_passes(chunks, 1) == [[c] for c in chunks]  # a chunk wider than a pass: alone
    assert logit_losses._teacher_passes(chunks, 100) == [chunks]
    # A pass's [spans, V_shared] float32 logits under 1/16 of the head's bytes, at least a student chunk: the demo
    # teacher (49k x 576, bf16, 37k shared ids) one chunk (23 spans' worth), Qwen1.5-1.8B's fp32 head (152k x 2048,
    # 40k shared) 486 spans.
    assert logit_losses.SPAN_CHUNK == 64
    assert logit_losses.teacher_pass_spans(torch.empty(49152, 576, dtype=torch.bfloat16, device="meta"), 36961) == 64
    assert logit_losses.teacher_pass_spans(torch.empty(151936, 2048, device="meta"), 40000) == 486
    assert logit_losses.teacher_pass_spans(torch.empty(262144, 2560, device="meta"), 20000) == 2097  # 2560 wide
    assert logit_losses.teacher_pass_spans(torch.empty(100, 8, device="meta"), 0) == 64


def test_backward_twice_with_retain_graph_gives_the_gradients_twice():
    """Nothing is consumed by a backward: two of them through a retained graph accumulate exactly twice the plain
    gradients, with another loss reading the same logits."""
    hidden, weight, tokens, rows, teacher, t_weight = _tokens_case(seed=5)
    student_head, teacher_head = SharedHead(weight, None, rows), SharedHead(t_weight, None, torch.arange(8))
    labels = _labels(seed=5)
    logits = hidden @ weight.T
    expected = (plain_span_kl(_centres(hidden, tokens), teacher, head_function(student_head),
                              head_function(teacher_head), 2.0, 2)
                + plain_ce(logits, labels) + logits.square().mean())
    expected_grads = torch.autograd.grad(expected, (hidden, weight))

    logits = hidden @ weight.T
    ce, kl = ce_and_span_kl(logits, labels, tokens, rows, teacher, teacher_head, 2.0, 2, chunk=2)
    loss = ce + kl + logits.square().mean()
    loss.backward(retain_graph=True)
    once = (hidden.grad.clone(), weight.grad.clone())
    loss.backward()
    for first, total, e in zip(once, (hidden.grad, weight.grad), expected_grads):
        torch.testing.assert_close(first, e, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(total, 2 * e, rtol=1e-4, atol=1e-6)


def test_without_grad_no_spans_and_errors():
    hidden, weight, tokens, rows, teacher, t_weight = _tokens_case(seed=4)
    student_head, teacher_head = SharedHead(weight, None, rows), SharedHead(t_weight, None, torch.arange(8))
    labels = _labels(seed=4)
    expected = plain_span_kl(_centres(hidden, tokens), teacher, head_function(student_head),
                             head_function(teacher_head), 2.0, 2)
    with torch.no_grad():  # values only: nothing kept for a backward
        ce, kl = ce_and_span_kl(hidden @ weight.T, labels, tokens, rows, teacher, teacher_head, 2.0, 2)
    assert kl.item() == pytest.approx(expected.item(), rel=1e-5)
    assert ce.item() == pytest.approx(plain_ce(hidden @ weight.T, labels).item(), rel=1e-6)

    none = SpanTokens(tokens.positions[:0], tokens.spans[:0], tokens.weights[:0], 0)
    ce, kl = ce_and_span_kl(hidden @ weight.T, labels, none, rows, teacher[:0], teacher_head, 2.0, 2)
    assert kl.item() == 0.0 and kl.requires_grad and ce.item() > 0
    logits = hidden @ weight.T
    with pytest.raises(ValueError, match="tokens describe 6 spans, the teacher's centres 3"):
        ce_and_span_kl(logits, labels, tokens, rows, teacher[:3], teacher_head, 2.0, 2)
    with pytest.raises(ValueError, match="shared ids differ"):
        ce_and_span_kl(logits, labels, tokens, rows[:3], teacher, teacher_head, 2.0, 2)


@pytest.mark.parametrize("vocab, shared", [(300, 200), (3000, 1000)])  # shared rows gathered once; read in blocks
def test_a_bf16_teacher_head_computes_in_float32_on_a_cpu_without_a_fast_bf16_product(monkeypatch, vocab, shared):
    """Without AVX-512 (an AVX2 CPU: torch's bf16 matrix product ~7x slower than float32's) the teacher's span logits
    are the float32 product of the same bf16 values: equal to a float32 head holding those values. With it, the
    product stays bf16 and its output is rounded."""
    gen = torch.Generator().manual_seed(11)
    spans = 40
    logits = torch.randn(1, spans + 1, vocab, generator=gen) * 3
    rows = torch.randperm(vocab, generator=gen)[:shared]
    t_rows = torch.randperm(vocab, generator=gen)[:shared]
    t_weight = (torch.randn(vocab, 16, generator=gen) * 2).bfloat16()
    teacher = torch.randn(spans, 16, generator=gen).bfloat16().float()  # bf16 values, as rounded for the product
    tokens = SpanTokens(torch.arange(spans), torch.arange(spans), torch.ones(spans), spans)
    labels = torch.randint(0, vocab, (1, spans + 1), generator=gen)

    def kl(weight, capability):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        student = logits.clone().requires_grad_(True)
        value = ce_and_span_kl(student, labels, tokens, rows, teacher, SharedHead(weight, None, t_rows), 2.0, 1)[1]
        return value, torch.autograd.grad(value, student)[0]

    same_values, same_grad = kl(t_weight.float(), "AVX2")
    avx2, avx2_grad = kl(t_weight, "AVX2")
    assert product_dtype(t_weight) == torch.float32
    torch.testing.assert_close(avx2, same_values, rtol=1e-6, atol=0)
    torch.testing.assert_close(avx2_grad, same_grad, rtol=1e-5, atol=1e-8)
    avx512, _ = kl(t_weight, "AVX512")
    assert product_dtype(t_weight) == torch.bfloat16 and product_dtype(t_weight.float()) == torch.float32
    torch.testing.assert_close(avx512, same_values, rtol=1e-2, atol=0)  # bf16 rounding of the output only
    assert abs(avx512 - same_values) > abs(avx2 - same_values)
