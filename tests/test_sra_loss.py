"""SRA losses: hand-computed cases, a plain-loop reference (values and gradients), switches, edge cases, module form."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sra_reference import plain_span_kl

from sra_distill.data.batch import IGNORE_INDEX, ModelView, PairedBatch, SideBatch
from sra_distill.data.vocab import SharedVocab
from sra_distill.errors import ModelSourceError
from sra_distill.fields import SettingError
from sra_distill.losses.fused_span_kl import SharedHead
from sra_distill.losses.sra import SRAConfig, SRALoss, span_centers, sra_loss, token_mass


def _all_rows(weight: torch.Tensor, bias: torch.Tensor | None = None) -> SharedHead:
    """A head whose every row is shared."""
    return SharedHead(weight, bias, torch.arange(weight.shape[0]))


def _identity_projector(dim: int) -> torch.nn.Linear:
    projector = torch.nn.Linear(dim, dim)
    with torch.no_grad():
        projector.weight.copy_(torch.eye(dim))
        projector.bias.zero_()
    return projector


# ---------------------------------------------------------------- hand-computed case


def test_two_spans_by_hand_and_an_empty_sample():
    # Sample 0 -- student: tokens [2,0], [0,2] in span 0 (masses .25, .25) and [0,3] in span 1 (mass .5)
    #   -> C^S = [1,1], [0,3].  Teacher: [1,1] in span 0 (mass .2), [-1,1] in span 1 (mass .8) -> w = (.2, .8).
    # Sample 1 has no spans at all and only enlarges B to 2.
    student_hidden = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [0.0, 3.0]], [[5.0, 1.0], [1.0, 1.0], [0.0, 1.0]]])
    teacher_hidden = torch.tensor([[[1.0, 1.0], [-1.0, 1.0]], [[3.0, 1.0], [1.0, 2.0]]])
    student_mass = torch.tensor([[0.25, 0.25, 0.5], [0.2, 0.3, 0.5]])
    teacher_mass = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    student_spans = torch.tensor([[0, 0, 1], [-1, -1, -1]])
    teacher_spans = torch.tensor([[0, 1], [-1, -1]])
    head = _all_rows(torch.eye(2))  # a "vocabulary" of 2 whose logits are the CoM coordinates
    out = sra_loss(
        student_hidden, teacher_hidden, student_mass, teacher_mass, student_spans, teacher_spans,
        _identity_projector(2), head, head,
    )
    batch = 2
    # cos: span 0 aligned (cos 1); span 1: cos([0,3], [-1,1]) = 1/sqrt2.
    expected_cos = 0.8 * (1 - 1 / math.sqrt(2)) / batch
    # geo: pi_01 = pi_10 = 1/2; student cos(C0, C1) = 1/sqrt2, teacher cos([1,1], [-1,1]) = 0.
    expected_geo = 2 * 0.5 * (1 / math.sqrt(2) - 0.0) ** 2 / batch
    # kl: span 0 identical logits -> 0; span 1: z^T/2 = (-.5, .5), z^S/2 = (0, 1.5).
    p_t = [1 / (1 + math.e), math.e / (1 + math.e)]
    p_s = [1 / (1 + math.exp(1.5)), math.exp(1.5) / (1 + math.exp(1.5))]
    expected_kl = sum(p * math.log(p / q) for p, q in zip(p_t, p_s)) / batch
    assert out["cos"].item() == pytest.approx(expected_cos, rel=1e-5)
    assert out["geo"].item() == pytest.approx(expected_geo, rel=1e-5)
    assert out["kl"].item() == pytest.approx(expected_kl, rel=1e-5)
    assert out["span_total"].item() == pytest.approx(expected_cos + 50 * expected_geo + expected_kl, rel=1e-5)


# ---------------------------------------------------------------- plain-loop reference


def _reference(inputs, projector, head_s, head_t, tau, weighted_pooling, weighted_loss):
    """Per-sample, per-span Python loops straight from the formulas of docs/sra-method.md."""
    hs, ht, ms, mt, ids_s, ids_t = inputs
    batch = hs.shape[0]
    cos_total, geo_total, kl_total = 0.0, 0.0, 0.0
    for b in range(batch):
        n = int(max(ids_s[b].max(), ids_t[b].max())) + 1
        cs, ct, mass_t = [], [], []
        for k in range(n):
            sel_s = [t for t in range(hs.shape[1]) if ids_s[b, t] == k]
            sel_t = [t for t in range(ht.shape[1]) if ids_t[b, t] == k]
            if weighted_pooling:
                cs.append(sum(ms[b, t] * hs[b, t] for t in sel_s) / max(sum(ms[b, t] for t in sel_s), 1e-5))
                ct.append(sum(mt[b, t] * ht[b, t] for t in sel_t) / max(sum(mt[b, t] for t in sel_t), 1e-5))
            else:
                cs.append(sum(hs[b, t] for t in sel_s) / len(sel_s))
                ct.append(sum(ht[b, t] for t in sel_t) / len(sel_t))
            mass_t.append(sum(mt[b, t] for t in sel_t))
        if n == 0:
            continue
        w = [m / sum(mass_t) for m in mass_t] if weighted_loss else [1.0 / n] * n
        for k in range(n):
            cos_total = cos_total + w[k] * (1 - F.cosine_similarity(projector(cs[k]), ct[k], dim=0))
            log_q = F.log_softmax(head_s(cs[k]) / tau, dim=0)
            log_p = F.log_softmax(head_t(ct[k]) / tau, dim=0)
            kl_total = kl_total + (log_p.exp() * (log_p - log_q)).sum()
        off_diagonal = sum(w[i] * w[j] for i in range(n) for j in range(n) if i != j)
        for i in range(n):
            for j in range(n):
                if i != j:
                    gap = F.cosine_similarity(cs[i], cs[j], dim=0) - F.cosine_similarity(ct[i], ct[j], dim=0)
                    geo_total = geo_total + w[i] * w[j] / off_diagonal * gap**2
    return cos_total / batch, geo_total / batch, kl_total / batch


def _random_inputs(seed: int, batch=3, t_s=9, t_t=7, d_s=5, d_t=4):
    gen = torch.Generator().manual_seed(seed)
    hs = torch.randn(batch, t_s, d_s, generator=gen, dtype=torch.float64)
    ht = torch.randn(batch, t_t, d_t, generator=gen, dtype=torch.float64)
    ms = torch.softmax(torch.randn(batch, t_s, generator=gen, dtype=torch.float64), -1)
    mt = torch.softmax(torch.randn(batch, t_t, generator=gen, dtype=torch.float64), -1)
    # Sample 0: 4 spans, some of several tokens; sample 1: a single span; sample 2: 3 spans with pad tokens around.
    ids_s = torch.tensor([[-1, 0, 0, 1, 2, 2, 2, 3, -1], [-1, -1, 0, 0, -1, -1, -1, -1, -1], [-1, 0, 1, 1, 2, -1, -1, -1, -1]])
    ids_t = torch.tensor([[-1, 0, 1, 1, 2, 3, 3], [-1, 0, -1, -1, -1, -1, -1], [0, 1, 2, 2, -1, -1, -1]])
    return hs, ht, ms, mt, ids_s, ids_t


@pytest.mark.parametrize("weighted_pooling,weighted_loss", [(True, True), (False, True), (True, False), (False, False)])
def test_matches_loop_reference_values_and_gradients(weighted_pooling, weighted_loss):
    hs, ht, ms, mt, ids_s, ids_t = (x.float() if x.is_floating_point() else x for x in _random_inputs(0))
    hs.requires_grad_(True)
    gen = torch.Generator().manual_seed(1)
    projector = torch.nn.Linear(5, 4)
    head_s_weight = torch.randn(6, 5, generator=gen)
    head_t_weight = torch.randn(6, 4, generator=gen)

    out = sra_loss(
        hs, ht, ms, mt, ids_s, ids_t, projector, _all_rows(head_s_weight), _all_rows(head_t_weight),
        config=SRAConfig(temperature=2.0, cos_weight=1.0, geo_weight=50.0, weighted_pooling=weighted_pooling,
                         weighted_loss=weighted_loss),
    )
    got_grads = torch.autograd.grad(out["span_total"], [hs, *projector.parameters()])

    ref_cos, ref_geo, ref_kl = _reference(
        (hs, ht, ms, mt, ids_s, ids_t), projector,
        lambda x: head_s_weight @ x, lambda x: head_t_weight @ x, 2.0, weighted_pooling, weighted_loss,
    )
    ref_total = ref_cos + 50.0 * ref_geo + ref_kl
    ref_grads = torch.autograd.grad(ref_total, [hs, *projector.parameters()])

    for name, ref in (("cos", ref_cos), ("geo", ref_geo), ("kl", ref_kl)):
        assert out[name].dtype == torch.float32
        assert out[name].item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6), name
    assert ref_geo.item() > 0 and ref_kl.item() > 0
    for got, ref in zip(got_grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_no_gradient_to_masses_teacher_or_teacher_head():
    hs, ht, ms, mt, ids_s, ids_t = _random_inputs(2)
    hs, ht, ms, mt = (x.float().requires_grad_(True) for x in (hs, ht, ms, mt))
    head_s = torch.nn.Linear(5, 6)
    head_t = torch.nn.Linear(4, 6)
    projector = torch.nn.Linear(5, 4)
    out = sra_loss(hs, ht, ms, mt, ids_s, ids_t, projector, _all_rows(head_s.weight, head_s.bias),
                   _all_rows(head_t.weight, head_t.bias))
    out["span_total"].backward()
    assert ms.grad is None and mt.grad is None and ht.grad is None
    assert all(p.grad is None for p in head_t.parameters())
    assert hs.grad is not None and hs.grad.abs().sum() > 0
    assert projector.weight.grad is not None and projector.weight.grad.abs().sum() > 0
    assert head_s.weight.grad.abs().sum() > 0  # the student's head learns through the span KL


def test_single_span_samples_have_no_geometry_and_empty_samples_contribute_nothing():
    hs, ht, ms, mt, _, _ = (x.float() for x in _random_inputs(3))
    ids_s = torch.full((3, 9), -1)
    ids_t = torch.full((3, 7), -1)
    ids_s[0, 2:4] = 0  # sample 0: one span; samples 1 and 2: none
    ids_t[0, 1] = 0
    hs.requires_grad_(True)
    projector = torch.nn.Linear(5, 4)
    out = sra_loss(hs, ht, ms, mt, ids_s, ids_t, projector)
    assert out["geo"].item() == 0.0
    assert out["kl"].item() == 0.0  # no heads given
    # One span with w = 1: cos term = (1 - cos) / B.
    cs = (ms[0, 2] * hs[0, 2] + ms[0, 3] * hs[0, 3]) / (ms[0, 2] + ms[0, 3])
    expected = (1 - F.cosine_similarity(projector(cs), ht[0, 1], dim=0)) / 3
    assert out["cos"].item() == pytest.approx(expected.item(), rel=1e-5)

    no_spans = sra_loss(hs, ht, ms, mt, torch.full((3, 9), -1), torch.full((3, 7), -1), projector,
                        _all_rows(torch.randn(6, 5)), _all_rows(torch.randn(6, 4)))
    assert all(no_spans[k].item() == 0.0 for k in ("cos", "geo", "kl", "span_total"))
    no_spans["span_total"].backward()
    assert torch.isfinite(projector.weight.grad).all()


def test_bf16_teacher_is_computed_in_float32():
    hs, ht, ms, mt, ids_s, ids_t = (x.float() if x.is_floating_point() else x for x in _random_inputs(4))
    projector = torch.nn.Linear(5, 4)
    full = sra_loss(hs, ht, ms, mt, ids_s, ids_t, projector)
    half = sra_loss(hs, ht.bfloat16(), ms, mt.bfloat16(), ids_s, ids_t, projector)
    assert half["span_total"].dtype == torch.float32
    assert half["span_total"].item() == pytest.approx(full["span_total"].item(), rel=2e-2)


def test_bad_inputs_raise_clear_errors():
    hs, ht, ms, mt, ids_s, ids_t = _random_inputs(5)
    projector = torch.nn.Linear(5, 4)
    with pytest.raises(ValueError, match="both"):
        sra_loss(hs, ht, ms, mt, ids_s, ids_t, projector, student_head=_all_rows(torch.eye(5)))
    with pytest.raises(ValueError, match="batch sizes differ"):
        sra_loss(hs, ht[:2], ms, mt[:2], ids_s, ids_t[:2], projector)
    with pytest.raises(ValueError, match="span"):
        span_centers(hs, ms, ids_s, torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="mass"):
        span_centers(hs, ms[:, :3], ids_s, 4)


# ---------------------------------------------------------------- span_centers


def test_span_centers_weighted_and_mean_with_validity():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mass = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.0, 0.0]])
    span_ids = torch.tensor([[0, 0, 1, -1], [0, -1, -1, -1]])
    centers, span_mass, valid = span_centers(hidden, mass, span_ids, torch.tensor([2, 1]))
    assert centers.shape == (2, 2, 3)
    torch.testing.assert_close(centers[0, 0], (0.1 * hidden[0, 0] + 0.2 * hidden[0, 1]) / 0.3)
    torch.testing.assert_close(centers[0, 1], hidden[0, 2])
    torch.testing.assert_close(centers[1, 0], hidden[1, 0])
    torch.testing.assert_close(span_mass, torch.tensor([[0.3, 0.3], [0.5, 0.0]]))
    assert valid.tolist() == [[True, True], [True, False]]
    mean_centers, mean_mass, _ = span_centers(hidden, mass, span_ids, torch.tensor([2, 1]), weighted=False)
    torch.testing.assert_close(mean_centers[0, 0], (hidden[0, 0] + hidden[0, 1]) / 2)
    torch.testing.assert_close(mean_mass, span_mass)  # masses are reported either way (the weights use them)
    # A span whose tokens carry no mass: the 1e-5 floor keeps the centre finite (zero).
    zero_mass, _, _ = span_centers(hidden, torch.zeros(2, 4), span_ids, torch.tensor([2, 1]))
    assert torch.isfinite(zero_mass).all() and zero_mass.abs().sum() == 0


# ---------------------------------------------------------------- token_mass


def _attention_maps(batch=2, heads=3, seq=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, seq, seq, generator=gen)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_token_mass_full_maps_rows_and_summed_rows_agree(padding):
    maps = _attention_maps()
    if padding == "right":
        mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    else:
        mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    last = [3, 5] if padding == "right" else [5, 5]
    from_maps = token_mass(maps.requires_grad_(True), mask)
    per_head_row = torch.stack([maps[b, :, last[b]] for b in range(2)]).detach()
    from_rows = token_mass(per_head_row, mask)
    from_summed = token_mass(per_head_row.sum(1), mask)
    expected = torch.stack([maps[b, :, last[b]].sum(0) * mask[b] for b in range(2)]).detach()
    expected = expected / expected.sum(-1, keepdim=True)
    for got in (from_maps, from_rows, from_summed):
        torch.testing.assert_close(got, expected)
        assert not got.requires_grad
        assert (got[mask == 0] == 0).all()
        torch.testing.assert_close(got.sum(-1), torch.ones(2))


def test_token_mass_rejects_bad_shapes_and_empty_rows():
    with pytest.raises(ValueError, match="attention must be"):
        token_mass(torch.rand(2, 5), torch.ones(2, 6))
    with pytest.raises(ValueError, match="attention must be"):
        token_mass(torch.rand(2, 3, 6, 5), torch.ones(2, 6))
    with pytest.raises(ValueError, match="no real token"):
        token_mass(torch.rand(2, 3, 6, 6), torch.tensor([[1] * 6, [0] * 6]))


# ---------------------------------------------------------------- module form


def _side(input_ids_len, span_ids, mask):
    batch = span_ids.shape[0]
    return SideBatch(
        input_ids=torch.zeros(batch, input_ids_len, dtype=torch.long),
        attention_mask=mask,
        labels=torch.full((batch, input_ids_len), IGNORE_INDEX),
        span_ids=span_ids,
        response_start=torch.zeros(batch, dtype=torch.long),
    )


def _synthetic(seed=0, num_layers=2, vocab_s=11, vocab_t=13):
    """A PairedBatch with two layers of hidden states per side and attention rows for the last block."""
    hs, ht, _, _, ids_s, ids_t = _random_inputs(seed)
    hs, ht = hs.float(), ht.float()
    gen = torch.Generator().manual_seed(seed + 10)
    mask_s = (torch.arange(9) < torch.tensor([[9], [4], [6]])).long()
    mask_t = (torch.arange(7) < torch.tensor([[7], [2], [5]])).long()
    batch = PairedBatch(_side(9, ids_s, mask_s), _side(7, ids_t, mask_t), num_spans=torch.tensor([4, 1, 3]))
    student = ModelView(
        hidden={num_layers - 1: torch.randn(3, 9, 5, generator=gen).requires_grad_(True), num_layers: hs.requires_grad_(True)},
        attention_row={num_layers - 1: torch.rand(3, 9, generator=gen) * 3},
        logits=None,
        lm_head_weight=torch.randn(vocab_s, 5, generator=gen),
        num_layers=num_layers,
    )
    teacher = ModelView(
        hidden={num_layers - 1: torch.randn(3, 7, 4, generator=gen), num_layers: ht},
        attention_row={num_layers - 1: torch.rand(3, 7, generator=gen) * 3},
        logits=None,
        lm_head_weight=torch.randn(vocab_t, 4, generator=gen),
        lm_head_bias=torch.randn(vocab_t, generator=gen),
        num_layers=num_layers,
    )
    shared = SharedVocab(torch.tensor([0, 2, 3, 7, 10]), torch.tensor([12, 1, 4, 5, 0]), normalized=False)
    return batch, student, teacher, shared


def test_module_matches_functional_loss_with_restricted_heads():
    batch, student, teacher, shared = _synthetic()
    method = SRALoss(SRAConfig(), 5, 4, shared, student_num_layers=2, teacher_num_layers=2)
    needs = method.needs()
    assert needs.student_hidden_layers == (2,) and needs.teacher_hidden_layers == (2,)
    assert needs.student_attention_layers == (1,) and needs.teacher_attention_layers == (1,)
    assert not needs.teacher_logits
    out = method(batch, student, teacher)

    ms = token_mass(student.attention_row[1], batch.student.attention_mask)
    mt = token_mass(teacher.attention_row[1], batch.teacher.attention_mask)
    ref = sra_loss(student.hidden[2], teacher.hidden[2], ms, mt, batch.student.span_ids, batch.teacher.span_ids,
                   method.projectors[0], num_spans=batch.num_spans)
    # The plain span KL with reference heads: full vocabulary logits, then the shared columns.
    centres_s, _, valid_s = span_centers(student.hidden[2], ms, batch.student.span_ids, batch.num_spans)
    centres_t, _, valid_t = span_centers(teacher.hidden[2], mt, batch.teacher.span_ids, batch.num_spans)
    valid = valid_s & valid_t
    ref["kl"] = plain_span_kl(
        centres_s[valid], centres_t[valid], lambda x: (x @ student.lm_head_weight.T)[..., shared.student_ids],
        lambda x: (x @ teacher.lm_head_weight.T + teacher.lm_head_bias)[..., shared.teacher_ids], 2.0, 3,
    )
    for name in ("cos", "geo", "kl"):
        assert out[name].item() == pytest.approx(ref[name].item(), rel=1e-5)
        assert out[name].item() > 0
    assert out["distill"].item() == pytest.approx(ref["span_total"].item() + ref["kl"].item(), rel=1e-5)
    out["distill"].backward()
    assert method.projectors[0].weight.grad is not None
    assert student.hidden[2].grad.abs().sum() > 0


@pytest.mark.parametrize("switch", ["use_cos", "use_geo", "use_kl"])
def test_module_ablation_switches(switch):
    batch, student, teacher, shared = _synthetic(seed=1)
    full = SRALoss(SRAConfig(), 5, 4, shared, 2, 2)
    ablated = SRALoss(SRAConfig(**{switch: False}), 5, 4, shared, 2, 2)
    if switch != "use_cos":
        ablated.load_state_dict(full.state_dict())
    else:
        assert len(ablated.projectors) == 0  # no unused parameters without the cos term
    out_full = full(batch, student, teacher)
    out = ablated(batch, student, teacher)
    term = {"use_cos": "cos", "use_geo": "geo", "use_kl": "kl"}[switch]
    weight = {"cos": 1.0, "geo": 50.0, "kl": 1.0}[term]
    assert out[term].item() == 0.0
    assert out["distill"].item() == pytest.approx(out_full["distill"].item() - weight * out_full[term].item(), rel=1e-5)


def test_module_pooling_and_weight_ablations_need_no_attention():
    batch, student, teacher, shared = _synthetic(seed=2)
    config = SRAConfig(weighted_pooling=False, weighted_loss=False, use_kl=False)
    method = SRALoss(config, 5, 4, None, 2, 2)
    needs = method.needs()
    assert needs.student_attention_layers == () and needs.teacher_attention_layers == ()
    student.attention_row.clear()
    teacher.attention_row.clear()
    out = method(batch, student, teacher)
    uniform = torch.full((3, 9), 1.0)
    ref = sra_loss(
        student.hidden[2], teacher.hidden[2], uniform, torch.full((3, 7), 1.0), batch.student.span_ids,
        batch.teacher.span_ids, method.projectors[0], config=config,
    )
    assert out["cos"].item() == pytest.approx(ref["cos"].item(), rel=1e-5)
    assert out["geo"].item() == pytest.approx(ref["geo"].item(), rel=1e-5)


def test_module_multiple_layer_pairs_average_cos_and_use_last_pair_for_geo_kl():
    batch, student, teacher, shared = _synthetic(seed=3)
    config = SRAConfig(layer_pairs=[[-2, -2], [-1, -1]])  # lists, as YAML gives them
    method = SRALoss(config, 5, 4, shared, 2, 2)
    assert method.layer_pairs == [(1, 1), (2, 2)]
    out = method(batch, student, teacher)
    ms = token_mass(student.attention_row[1], batch.student.attention_mask)
    mt = token_mass(teacher.attention_row[1], batch.teacher.attention_mask)
    per_pair = [
        sra_loss(student.hidden[layer], teacher.hidden[layer], ms, mt, batch.student.span_ids,
                 batch.teacher.span_ids, method.projectors[i])
        for i, layer in enumerate((1, 2))
    ]
    assert out["cos"].item() == pytest.approx((per_pair[0]["cos"] + per_pair[1]["cos"]).item() / 2, rel=1e-5)
    assert out["geo"].item() == pytest.approx(per_pair[1]["geo"].item(), rel=1e-5)


def test_module_bf16_teacher_view():
    batch, student, teacher, shared = _synthetic(seed=4)
    method = SRALoss(SRAConfig(), 5, 4, shared, 2, 2)
    reference = method(batch, student, teacher)
    teacher.hidden = {k: v.bfloat16() for k, v in teacher.hidden.items()}
    teacher.lm_head_weight = teacher.lm_head_weight.bfloat16()
    teacher.lm_head_bias = teacher.lm_head_bias.bfloat16()
    out = method(batch, student, teacher)
    assert all(out[k].dtype == torch.float32 for k in ("distill", "cos", "geo", "kl"))
    assert out["distill"].item() == pytest.approx(reference["distill"].item(), rel=5e-2)


def test_module_configuration_errors():
    _, student, teacher, shared = _synthetic()
    # User errors (one line in the CLI): the models' depths are known only once they load.
    with pytest.raises(ModelSourceError, match="share no token"):
        SRALoss(SRAConfig(), 5, 4, None, 2, 2)
    with pytest.raises(SettingError, match=r"^methods\.sra\.layer_pairs: student layer index 5 is out of range"):
        SRALoss(SRAConfig(layer_pairs=[(5, -1)]), 5, 4, shared, 2, 2)
    with pytest.raises(ValueError, match="temperature"):
        SRAConfig(temperature=0)
    with pytest.raises(ValueError, match="distils nothing"):
        SRAConfig(use_cos=False, use_geo=False, use_kl=False)
    batch, student, teacher, shared = _synthetic()
    method = SRALoss(SRAConfig(layer_pairs=[(0, -1)]), 5, 4, shared, 2, 2)
    with pytest.raises(KeyError, match="not captured"):
        method(batch, student, teacher)
