"""SRA's span KL from the student's token logits in one node with the CE (against the centres' path and the engine's
own CE), a second backward through a retained graph, per-pair attention layers (against a plain per-layer computation), the teacher head read afresh every step,
and the projector settings."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sra_distill.data.batch import IGNORE_INDEX, ModelView, PairedBatch, SideBatch
from sra_distill.data.vocab import SharedVocab
from sra_distill.losses.fused_span_kl import SharedHead
from sra_distill.losses.logit_losses import causal_lm_ce
from sra_distill.losses.sra import SRAConfig, SRALoss, kl_divisor, span_centers, span_pooling, sra_loss, token_mass
from sra_distill.models.capture import capture


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _side(span_ids, mask, input_ids=None):
    batch, length = span_ids.shape
    return SideBatch(
        input_ids=torch.zeros(batch, length, dtype=torch.long) if input_ids is None else input_ids,
        attention_mask=mask, labels=torch.full((batch, length), IGNORE_INDEX), span_ids=span_ids,
        response_start=torch.zeros(batch, dtype=torch.long),
    )


def _views(seed=0, layers=3, student_bias=False):
    """Student/teacher views with `layers` blocks: hidden states for every layer, attention rows for every block,
    student logits = final hidden @ W^T (as a bias-free head gives them), spans of 1-3 tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids_s = torch.tensor([[-1, 0, 1, 1, 2, 3, 3, 3, 4, -1], [-1, -1, 0, 1, 2, 2, -1, -1, -1, -1]])
    ids_t = torch.tensor([[-1, 0, 0, 1, 2, 3, 4, -1], [-1, 0, 1, 2, 2, 2, -1, -1]])
    mask_s = torch.tensor([[1] * 10, [1] * 7 + [0] * 3])
    mask_t = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    batch = PairedBatch(_side(ids_s, mask_s), _side(ids_t, mask_t), num_spans=torch.tensor([5, 3]))
    ds, dt, vs, vt = 6, 5, 23, 19
    student_hidden = {i: torch.randn(2, 10, ds, generator=gen).requires_grad_(True) for i in range(layers + 1)}
    weight = torch.randn(vs, ds, generator=gen).requires_grad_(True)
    bias = torch.randn(vs, generator=gen).requires_grad_(True) if student_bias else None
    logits = student_hidden[layers] @ weight.T + (0 if bias is None else bias)
    student = ModelView(
        hidden=student_hidden, attention_row={i: torch.rand(2, 10, generator=gen) for i in range(layers)},
        logits=logits, lm_head_weight=weight, lm_head_bias=bias, num_layers=layers, logits_from_head=True,
    )
    teacher = ModelView(
        hidden={i: torch.randn(2, 8, dt, generator=gen) for i in range(layers + 1)},
        attention_row={i: torch.rand(2, 8, generator=gen) for i in range(layers)},
        logits=None, lm_head_weight=torch.randn(vt, dt, generator=gen).bfloat16(), num_layers=layers,
    )
    shared = SharedVocab(torch.tensor([0, 2, 3, 7, 10, 15, 22]), torch.tensor([12, 1, 4, 5, 0, 18, 3]), False)
    return batch, student, teacher, shared


def _ce(out, student, labels):
    """The CE as the engine takes it: the method's own when it returns one (losses/base.py)."""
    return out["ce"] if "ce" in out else causal_lm_ce(student.logits, labels)


def _grads(out, student, labels, retain_graph=False):
    loss = out["distill"] * 0.7 + (_ce(out, student, labels) if labels is not None else 0.0)
    tensors = [*student.hidden.values(), student.lm_head_weight]
    if student.lm_head_bias is not None:
        tensors.append(student.lm_head_bias)
    return torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=retain_graph)


@pytest.mark.parametrize("with_ce", [True, False])
@pytest.mark.parametrize("weighted_pooling", [True, False])
def test_reused_logits_equal_the_fused_path(with_ce, weighted_pooling):
    labels = torch.randint(0, 23, (2, 10), generator=torch.Generator().manual_seed(9)) if with_ce else None
    results = {}
    for reuse in (True, False):
        batch, student, teacher, shared = _views(seed=1)
        if labels is not None:
            batch.student.labels = labels
        method = SRALoss(SRAConfig(reuse_student_logits=reuse, weighted_pooling=weighted_pooling), 6, 5, shared, 3, 3)
        torch.manual_seed(0)
        method.projectors[0].reset_parameters()
        out = method(batch, student, teacher)
        assert ("ce" in out) == reuse  # the CE comes with the span KL only from the token logits
        results[reuse] = ({k: v.item() for k, v in out.items()}, _grads(out, student, labels))
    (values, grads), (ref_values, ref_grads) = results[True], results[False]
    assert values["kl"] > 0
    if labels is not None:
        assert values["ce"] == pytest.approx(causal_lm_ce(_views(seed=1)[1].logits, labels).item(), rel=1e-6)
    for name in ("kl", "cos", "geo", "distill"):
        assert values[name] == pytest.approx(ref_values[name], rel=1e-5, abs=1e-7)
    for got, expected in zip(grads, ref_grads):
        if expected is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_token_logits_are_reused_only_for_a_bias_free_head_on_its_own_input():
    batch, student, teacher, shared = _views(seed=2, student_bias=True)
    method = SRALoss(SRAConfig(), 6, 5, shared, 3, 3)
    assert method._reusable_logits(student) is None  # bias
    batch, student, teacher, shared = _views(seed=2)
    assert method._reusable_logits(student) is student.logits
    assert SRALoss(SRAConfig(reuse_student_logits=False), 6, 5, shared, 3, 3)._reusable_logits(student) is None
    inner = SRALoss(SRAConfig(layer_pairs=[[-2, -1]]), 6, 5, shared, 3, 3)
    assert inner._reusable_logits(student) is None  # the pair's student layer is not the head's input
    student.logits_from_head = False
    assert method._reusable_logits(student) is None


@pytest.mark.parametrize("reuse", [True, False])
def test_backward_twice_through_a_retained_graph(reuse):
    """CE + SRA backward twice with retain_graph=True: every gradient is exactly twice the one of a single pass."""
    labels = torch.randint(0, 23, (2, 10), generator=torch.Generator().manual_seed(9))
    batch, student, teacher, shared = _views(seed=8)
    batch.student.labels = labels
    method = SRALoss(SRAConfig(reuse_student_logits=reuse), 6, 5, shared, 3, 3)
    out = method(batch, student, teacher)
    once = _grads(out, student, labels, retain_graph=True)
    loss = out["distill"] * 0.7 + _ce(out, student, labels)
    loss.backward(retain_graph=True)
    loss.backward()
    tensors = [*student.hidden.values(), student.lm_head_weight]
    assert once[-1].abs().sum() > 0
    for tensor, single in zip(tensors, once):
        if single is None:
            assert tensor.grad is None
        else:
            torch.testing.assert_close(tensor.grad, 2 * single, rtol=1e-5, atol=1e-7)


def test_span_pooling_tokens_rebuild_the_centres():
    batch, student, teacher, _ = _views(seed=3)
    mass = token_mass(student.attention_row[2], batch.student.attention_mask)
    for weighted in (True, False):
        centres, _, valid = span_centers(student.hidden[3], mass, batch.student.span_ids, batch.num_spans, weighted)
        valid = valid & torch.tensor([[True, False, True, True, True], [True, True, True, False, False]])
        tokens = span_pooling(mass, batch.student.span_ids, batch.num_spans, weighted).tokens(valid)
        flat = student.hidden[3].detach().reshape(-1, 6)
        rebuilt = torch.zeros(tokens.num_spans, 6).index_add(0, tokens.spans, flat[tokens.positions] * tokens.weights[:, None])
        torch.testing.assert_close(rebuilt, centres.detach()[valid], rtol=1e-5, atol=1e-6)


def test_end_to_end_with_capture_reuse_equals_fused():
    """A real GPT-2 student through capture (the flag comes from the model), CE + SRA: same parameter gradients."""
    torch.manual_seed(0)
    student_model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40, n_positions=32))
    teacher_model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, vocab_size=30)).eval()
    student_model.config.dropout = 0.0
    student_model.eval()  # no dropout: both runs see the same network
    batch, _, _, _ = _views(seed=4)
    gen = torch.Generator().manual_seed(5)
    batch.student.input_ids = torch.randint(0, 40, (2, 10), generator=gen)
    batch.teacher.input_ids = torch.randint(0, 30, (2, 8), generator=gen)
    batch.student.labels = batch.student.input_ids.masked_fill(batch.student.span_ids < 0, IGNORE_INDEX)
    shared = SharedVocab(torch.tensor([1, 4, 9, 16, 25, 36]), torch.tensor([2, 3, 5, 7, 11, 13]), False)
    grads = {}
    for reuse in (True, False):
        method = SRALoss(SRAConfig(reuse_student_logits=reuse), 16, 16, shared, 2, 2)
        torch.manual_seed(1)
        method.projectors[0].reset_parameters()
        needs = method.needs()
        with torch.no_grad():
            teacher = capture(teacher_model, batch.teacher.input_ids, batch.teacher.attention_mask,
                              hidden_layers=needs.teacher_hidden_layers,
                              attention_layers=needs.teacher_attention_layers, logits=False)
        student = capture(student_model, batch.student.input_ids, batch.student.attention_mask,
                          hidden_layers=needs.student_hidden_layers, attention_layers=needs.student_attention_layers)
        assert student.logits_from_head
        out = method(batch, student, teacher)
        loss = 0.5 * _ce(out, student, batch.student.labels) + 0.5 * out["distill"]
        student_model.zero_grad()
        loss.backward()
        grads[reuse] = (out["kl"].item(), {n: p.grad.clone() for n, p in student_model.named_parameters()})
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-4)  # float32 sums in another order
    for name, expected in grads[False][1].items():
        torch.testing.assert_close(grads[True][1][name], expected, rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------- per-pair attention layers


def test_each_pair_takes_masses_from_its_own_attention_layer():
    batch, student, teacher, shared = _views(seed=6)
    config = SRAConfig(layer_pairs=[[0, 1], [1, 2], [-1, -1]], use_kl=False)
    method = SRALoss(config, 6, 5, None, 3, 3)
    assert method.layer_pairs == [(0, 1), (1, 2), (3, 3)]
    assert method.attention_pairs == [(0, 1), (1, 2), (2, 2)]  # the final norm's attention is the last block's
    needs = method.needs()
    assert needs.student_attention_layers == (0, 1, 2) and needs.teacher_attention_layers == (1, 2)
    out = method(batch, student, teacher)

    # Plain per-layer computation: each pair on its own, masses from its own block's attention row.
    per_pair = []
    for index, ((s_layer, t_layer), (s_block, t_block)) in enumerate(zip(method.layer_pairs, method.attention_pairs)):
        ms = token_mass(student.attention_row[s_block], batch.student.attention_mask)
        mt = token_mass(teacher.attention_row[t_block], batch.teacher.attention_mask)
        per_pair.append(sra_loss(student.hidden[s_layer], teacher.hidden[t_layer], ms, mt, batch.student.span_ids,
                                 batch.teacher.span_ids, method.projectors[index]))
    expected_cos = sum(p["cos"] for p in per_pair) / 3
    assert out["cos"].item() == pytest.approx(expected_cos.item(), rel=1e-5)
    assert out["geo"].item() == pytest.approx(per_pair[-1]["geo"].item(), rel=1e-5)
    # Not what one shared attention layer gives: the per-pair masses matter.
    shared_layer = SRALoss(SRAConfig(layer_pairs=[[0, 1], [1, 2], [-1, -1]], use_kl=False,
                                     attention_layer_student=-1, attention_layer_teacher=-1), 6, 5, None, 3, 3)
    assert shared_layer.attention_pairs == [(2, 2)] * 3
    shared_layer.load_state_dict(method.state_dict())
    assert abs(shared_layer(batch, student, teacher)["cos"].item() - out["cos"].item()) > 1e-6


def test_explicit_attention_blocks_per_pair_and_errors():
    method = SRALoss(SRAConfig(layer_pairs=[[1, 1, 0, 2], [-1, -1]], use_kl=False), 6, 5, None, 3, 3)
    assert method.attention_pairs == [(0, 2), (2, 2)]
    with pytest.raises(ValueError, match="layer_pairs"):
        SRAConfig(layer_pairs=[[1, 1, 0]])
    with pytest.raises(ValueError, match="student attention index 5"):
        SRALoss(SRAConfig(layer_pairs=[[1, 1, 5, 0]], use_kl=False), 6, 5, None, 3, 3)


# ---------------------------------------------------------------- teacher head slice, projector settings


def test_teacher_head_is_read_afresh_every_step():
    """No cached slice of the teacher's head: a change to it in place shows in the next step's span KL."""
    batch, student, teacher, shared = _views(seed=7)
    method = SRALoss(SRAConfig(), 6, 5, shared, 3, 3)
    before = method(batch, student, teacher)["kl"].item()
    with torch.no_grad():
        teacher.lm_head_weight.mul_(2)
    after = method(batch, student, teacher)["kl"].item()
    fresh = SRALoss(SRAConfig(), 6, 5, shared, 3, 3)
    fresh.load_state_dict(method.state_dict())
    assert after != pytest.approx(before, rel=1e-3)
    assert after == pytest.approx(fresh(batch, student, teacher)["kl"].item(), rel=1e-6)


def test_projector_bias_and_xavier_init():
    torch.manual_seed(0)
    method = SRALoss(SRAConfig(projector_bias=False, projector_init="xavier", use_kl=False,
                               layer_pairs=[[0, 0], [-1, -1]]), 64, 256, None, 2, 2)
    assert len(method.projectors) == 2
    for projector in method.projectors:
        assert projector.bias is None
        bound = (6 / (64 + 256)) ** 0.5  # Xavier-uniform bound; Kaiming-uniform's would be 1/sqrt(64) = 0.125
        assert projector.weight.abs().max() <= bound and projector.weight.abs().max() > 0.9 * bound
    with pytest.raises(ValueError, match="projector_init"):
        SRAConfig(projector_init="orthogonal")


def test_srav4_preset_loads_and_builds():
    from pathlib import Path

    from sra_distill.config import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/paper/srav4_qwen1.5-1.8b_to_gpt2-120m.yaml")
    sra = cfg.methods.sra
    assert (sra.cos_weight, sra.geo_weight, sra.projector_bias, sra.projector_init) == (2.0, 10.0, False, "xavier")
    assert cfg.projector_weight_decay == 0.0
    assert (cfg.lora.enabled, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (True, 256, 8, 0.1)
    assert cfg.lora.target_modules == ["c_attn", "c_proj"]
    shared = SharedVocab(torch.tensor([0, 1]), torch.tensor([0, 1]), False)
    method = SRALoss(sra, 768, 2048, shared, student_num_layers=12, teacher_num_layers=24)
    assert method.layer_pairs == [(3, 7), (7, 15), (12, 24)]
    assert method.attention_pairs == [(3, 7), (7, 15), (11, 23)]
    assert len(method.projectors) == 3 and all(p.bias is None for p in method.projectors)


@pytest.mark.slow
def test_engine_gives_the_projector_its_own_weight_decay(tmp_path):
    from pathlib import Path

    from sra_distill.config import load_config
    from sra_distill.train.engine import Trainer

    tiny = Path(__file__).resolve().parents[1] / "src/sra_distill/configs/tiny.yaml"
    cfg = load_config(tiny, [f"output_dir={tmp_path}", "weight_decay=0.05", "projector_weight_decay=0.0",
                             "methods.sra.layer_pairs=[[0, 0], [-1, -1]]", "methods.sra.projector_bias=false"])
    groups = Trainer(cfg).optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0, 0.0]
    assert sum(p.numel() for p in groups[-1]["params"]) == 2 * 32 * 48  # two bias-free projectors 32 -> 48
    cfg = load_config(tiny, [f"output_dir={tmp_path}", "weight_decay=0.05"])
    assert Trainer(cfg).optimizer.param_groups[-1]["weight_decay"] == 0.05  # null: the student's weight decay


@pytest.mark.parametrize("reuse", [True, False])
def test_kl_mean_normalization_is_the_paper_sum_rescaled_to_spans(reuse):
    """`kl_normalization="mean"` (a named departure) = the paper's per-sample sum x B / aligned spans, "tokens" = x B
    / the student tokens in them; cos and geo are untouched. The paper's "sum" stays the default and the reference."""
    outputs = {}
    for normalization in ("sum", "mean", "tokens"):
        batch, student, teacher, shared = _views(seed=3)
        method = SRALoss(SRAConfig(reuse_student_logits=reuse, kl_normalization=normalization), 6, 5, shared, 3, 3)
        torch.manual_seed(0)
        method.projectors[0].reset_parameters()
        out = method(batch, student, teacher)
        outputs[normalization] = out
    assert SRAConfig().kl_normalization == "sum"
    total, mean = outputs["sum"], outputs["mean"]
    spans = 5 + 3  # every span of _views is real on both sides
    assert mean["kl"].item() == pytest.approx(total["kl"].item() * 2 / spans, rel=1e-6)
    tokens = outputs["tokens"]
    assert tokens["kl"].item() == pytest.approx(total["kl"].item() * 2 / (8 + 4), rel=1e-6)  # student tokens in spans
    for name in ("cos", "geo"):
        assert mean[name].item() == pytest.approx(total[name].item(), rel=1e-6)
        assert tokens[name].item() == pytest.approx(total[name].item(), rel=1e-6)
    with pytest.raises(ValueError, match="kl_normalization"):
        SRAConfig(kl_normalization="per_token")


def test_functional_kl_normalization_matches_the_module_form():
    gen = torch.Generator().manual_seed(4)
    hidden_s, hidden_t = torch.randn(2, 5, 3, generator=gen), torch.randn(2, 4, 3, generator=gen)
    mass_s, mass_t = torch.rand(2, 5, generator=gen), torch.rand(2, 4, generator=gen)
    ids_s = torch.tensor([[0, 1, 1, 2, -1], [0, 0, 1, -1, -1]])
    ids_t = torch.tensor([[0, 1, 2, -1], [0, 1, -1, -1]])
    head = SharedHead(torch.randn(7, 3, generator=gen), None, torch.arange(7))
    args = (hidden_s, hidden_t, mass_s, mass_t, ids_s, ids_t, torch.nn.Identity(), head, head)
    total, mean = sra_loss(*args), sra_loss(*args, config=SRAConfig(kl_normalization="mean"))
    assert mean["kl"].item() == pytest.approx(total["kl"].item() * 2 / 5, rel=1e-6)  # 3 + 2 aligned spans
    tokens = sra_loss(*args, config=SRAConfig(kl_normalization="tokens"))
    assert tokens["kl"].item() == pytest.approx(total["kl"].item() * 2 / 7, rel=1e-6)  # student tokens in spans: 4 + 3


def test_kl_tokens_normalization_counts_only_tokens_of_aligned_spans():
    """"tokens" divides by the student tokens whose span is real on both sides: a span the teacher lacks (sample 1,
    span 1) adds neither KL nor tokens, and padding (-1) is never counted."""
    student_ids = torch.tensor([[0, 1, 1, 2, -1], [0, 0, 1, 1, -1]])
    teacher_ids = torch.tensor([[0, 1, 2, -1], [0, -1, -1, -1]])
    valid = torch.tensor([[True, True, True], [True, False, False]])
    assert kl_divisor(valid, "tokens", student_ids) == 4 + 2
    assert kl_divisor(valid, "mean", student_ids) == 3 + 1
    assert kl_divisor(valid, "sum", student_ids) == 2
    assert kl_divisor(torch.zeros(2, 3, dtype=torch.bool), "tokens", student_ids) == 1  # no aligned span: no 0 division
    gen = torch.Generator().manual_seed(5)
    hidden_s, hidden_t = torch.randn(2, 5, 3, generator=gen), torch.randn(2, 4, 3, generator=gen)
    mass_s, mass_t = torch.rand(2, 5, generator=gen), torch.rand(2, 4, generator=gen)
    head = SharedHead(torch.randn(7, 3, generator=gen), None, torch.arange(7))
    args = (hidden_s, hidden_t, mass_s, mass_t, student_ids, teacher_ids, None, head, head)
    total, tokens = sra_loss(*args), sra_loss(*args, config=SRAConfig(kl_normalization="tokens"))
    assert tokens["kl"].item() == pytest.approx(total["kl"].item() * 2 / 6, rel=1e-6)
