"""Baseline distillation losses: hand-computed values, degenerate cases, gradients, refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rapidfuzz.distance import Levenshtein
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from sra_distill.data.batch import IGNORE_INDEX, ModelView, PairedBatch, PairedExample, SideBatch, SideExample
from sra_distill.losses.base import Needs
from sra_distill.losses.divergences import KINDS, DivergenceConfig, DivergenceLoss, token_divergence
from sra_distill.losses.dskd import DSKDConfig, DSKDLoss
from sra_distill.losses.mined import ALIGN_KEY, MinEDConfig, MinEDLoss, dtw_student_to_teacher
from sra_distill.losses.mined_map import build_mined_map, compute_mined_map
from sra_distill.losses.multilevel_ot import MultiLevelOTConfig, MultiLevelOTLoss, sinkhorn_cost
from sra_distill.losses.sft import SFTConfig, SFTLoss
from sra_distill.losses.uld import ULDConfig, ULDLoss


def side(ids: list[list[int]], response_start: list[int], pad: int = 0) -> SideBatch:
    """Right-padded side whose labels are every token from response_start to the sample's end."""
    width = max(len(r) for r in ids)
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in ids])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])
    positions = torch.arange(width)[None]
    starts = torch.tensor(response_start)
    labelled = (positions >= starts[:, None]) & attention.bool()
    return SideBatch(
        input_ids=input_ids,
        attention_mask=attention,
        labels=torch.where(labelled, input_ids, torch.full_like(input_ids, IGNORE_INDEX)),
        span_ids=torch.full_like(input_ids, -1),
        response_start=starts,
    )


def view(logits: torch.Tensor, hidden: torch.Tensor | None = None, head: torch.Tensor | None = None,
         embed: torch.Tensor | None = None) -> ModelView:
    hidden = hidden if hidden is not None else torch.zeros(*logits.shape[:2], 4)
    return ModelView(
        hidden={1: hidden}, attention_row={}, logits=logits,
        lm_head_weight=head if head is not None else torch.zeros(logits.shape[-1], hidden.shape[-1]),
        num_layers=1, input_embedding_weight=embed,
    )


def word_tokenizer(words: list[str], name: str) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["[UNK]", "<eos>", *words])}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<eos>", pad_token="<eos>")
    tok.name_or_path = name
    return tok


def test_sft_is_ce_only():
    loss = SFTLoss(SFTConfig())
    assert SFTConfig.uses_teacher is False and SFTConfig().projector_lr is None  # no teacher, no projector
    assert loss.needs() == Needs()  # nothing captured beyond the student's logits
    batch = PairedBatch(side([[1, 2, 3]], [1]), side([[1, 2, 3]], [1]), torch.tensor([0]))
    out = loss(batch, view(torch.randn(1, 3, 5)), None)
    assert out["distill"].item() == 0.0


# ---- same-tokenizer divergences -------------------------------------------------------------------------------


def reference_divergence(kind: str, s: np.ndarray, t: np.ndarray, tau: float, lam: float = 0.1) -> float:
    q = np.exp(s / tau) / np.exp(s / tau).sum()
    p = np.exp(t / tau) / np.exp(t / tau).sum()
    kl = lambda a, b: float((a * np.log(a / b)).sum())  # noqa: E731
    if kind == "fkl":
        return kl(p, q)
    if kind == "rkl":
        return kl(q, p)
    if kind == "js":
        m = (p + q) / 2
        return (kl(p, m) + kl(q, m)) / 2
    if kind == "skl":
        return kl(p, lam * p + (1 - lam) * q)
    if kind == "srkl":
        return kl(q, (1 - lam) * p + lam * q)
    order = np.argsort(p)  # akl
    cum = np.cumsum(p[order])
    gap = np.abs(p[order] - q[order])
    g_tail, g_head = gap[cum < 0.5].sum(), gap[cum >= 0.5].sum()
    return (g_head * kl(p, q) + g_tail * kl(q, p)) / (g_head + g_tail)


@pytest.mark.parametrize("kind", KINDS)
def test_divergence_values_identity_and_gradients(kind):
    gpt2 = word_tokenizer(["a", "b", "c"], "same")
    torch.manual_seed(0)
    student_logits = torch.randn(2, 5, 7, requires_grad=True)
    teacher_logits = torch.randn(2, 5, 7)
    batch = PairedBatch(side([[1, 2, 3, 4, 5], [1, 2, 3]], [2, 1]), side([[1, 2, 3, 4, 5], [1, 2, 3]], [2, 1]),
                        torch.tensor([0, 0]))
    loss = DivergenceLoss(DivergenceConfig(kind=kind, temperature=2.0), gpt2, gpt2)
    out = loss(batch, view(student_logits), view(teacher_logits))
    # Rows predicting labels: sample 0 rows 1..3 (labels at 2..4); sample 1 rows 0..1 (labels at 1..2).
    rows = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    expected = np.mean([
        reference_divergence(kind, student_logits[b, r].detach().numpy().astype(np.float64),
                             teacher_logits[b, r].numpy().astype(np.float64), 2.0)
        for b, r in rows
    ])
    assert out["distill"].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    out["distill"].backward()
    assert torch.isfinite(student_logits.grad).all() and student_logits.grad.abs().sum() > 0
    same = loss(batch, view(teacher_logits.clone()), view(teacher_logits))
    assert same["distill"].item() == pytest.approx(0.0, abs=1e-6)


def test_divergence_refuses_cross_tokenizer_pair():
    a = word_tokenizer(["hello", "world"], "tok-a")
    b = word_tokenizer(["hello", "there"], "tok-b")
    with pytest.raises(ValueError, match=r"divergence 'fkl'.*tok-a.*tok-b"):
        DivergenceLoss(DivergenceConfig(kind="fkl"), a, b)
    with pytest.raises(ValueError, match="kind: expected one of fkl, rkl, js, skl, srkl, akl, got 'kl2'"):
        DivergenceLoss(DivergenceConfig(kind="kl2"), a, a)


def test_akl_reference_matches_dskd_formula_on_skewed_rows():
    s = torch.tensor([[2.0, 0.0, -1.0, 0.5]])
    t = torch.tensor([[3.0, 1.0, -2.0, 0.0]])
    got = token_divergence("akl", s, t, DivergenceConfig(temperature=1.0)).item()
    assert got == pytest.approx(reference_divergence("akl", s[0].numpy(), t[0].numpy(), 1.0), rel=1e-5)


# ---- ULD ------------------------------------------------------------------------------------------------------


def test_uld_hand_value_truncation_and_gradient():
    # Student vocab 3, teacher vocab 4; student prompt 1 token + 2 response, teacher prompt 2 + 3 response.
    s_logits = torch.log(torch.tensor([[[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]]])).requires_grad_(True)
    t_logits = torch.log(torch.tensor([[[.25] * 4, [.25] * 4, [0.4, 0.3, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1],
                                        [.25] * 4]]))
    batch = PairedBatch(side([[1, 2, 3]], [1]), side([[1, 2, 3, 4, 5]], [2]), torch.tensor([0]))
    out = ULDLoss(ULDConfig())(batch, view(s_logits), view(t_logits))
    # Pairs: student rows 0,1 with teacher rows 1,2 (the third teacher response row has no partner).
    # Row 0: sorted S (.5,.3,.2,0) vs T (.25,.25,.25,.25): .25+.05+.05+.25 = .6
    # Row 1: sorted S (.6,.3,.1,0) vs T (.4,.3,.2,.1): .2+0+.1+.1 = .4
    assert out["distill"].item() == pytest.approx(0.5, abs=1e-6)
    out["distill"].backward()
    assert torch.isfinite(s_logits.grad).all() and s_logits.grad[0, :2].abs().sum() > 0
    assert s_logits.grad[0, 2].abs().sum() == 0  # the last row predicts nothing


def test_uld_identity_is_zero_and_mean_is_per_sample():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 9)
    sb = side([[1, 2, 3, 4, 5, 6], [1, 2, 3]], [1, 2])
    batch = PairedBatch(sb, sb, torch.tensor([0, 0]))
    assert ULDLoss(ULDConfig())(batch, view(logits), view(logits))["distill"].item() == pytest.approx(0, abs=1e-6)
    teacher = torch.randn(2, 6, 9)
    out = ULDLoss(ULDConfig())(batch, view(logits), view(teacher))["distill"].item()
    l1 = lambda b, r: (logits[b, r].softmax(-1).sort(descending=True).values  # noqa: E731
                       - teacher[b, r].softmax(-1).sort(descending=True).values).abs().sum().item()
    expected = (np.mean([l1(0, r) for r in range(5)]) + l1(1, 1)) / 2
    assert out == pytest.approx(expected, rel=1e-5)


# ---- MinED ----------------------------------------------------------------------------------------------------


STUDENT_WORDS = ["hello", "world", "hel", "lo", "cat", "dog"]
TEACHER_WORDS = ["hello", "world", "cats", "dg", "bird"]


def test_mined_map_exact_nearest_roles_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SRA_CACHE", str(tmp_path))
    s_tok, t_tok = word_tokenizer(STUDENT_WORDS, "s"), word_tokenizer(TEACHER_WORDS, "t")
    mapping = compute_mined_map(s_tok, t_tok)
    s_vocab, t_vocab = s_tok.get_vocab(), t_tok.get_vocab()
    assert mapping[t_vocab["hello"]] == s_vocab["hello"]  # exact
    assert mapping[t_vocab["cats"]] == s_vocab["cat"]  # distance 1
    assert mapping[t_vocab["dg"]] == s_vocab["dog"]  # distance 1
    assert mapping[t_vocab["<eos>"]] == s_vocab["<eos>"]  # role to role
    # "bird" matches nothing closely: the lowest student id among those at minimum distance wins.
    distances = {w: Levenshtein.distance("bird", w) for w in s_vocab}
    best = min(distances.values())
    assert mapping[t_vocab["bird"]] == min(s_vocab[w] for w, d in distances.items() if d == best)
    cached = build_mined_map(s_tok, t_tok)
    assert torch.equal(cached, mapping)
    assert len(list((tmp_path / "mined_map").glob("*.pt"))) == 1


def test_dtw_alignment_matches_hand_case():
    # teacher: hello world ; student: hel lo world  (costs: Levenshtein)
    cost = np.array([[2.0, 3.0, 4.0], [5.0, 4.0, 0.0]])
    assert dtw_student_to_teacher(cost) == [[0], [0], [1]]


def _example(s_ids, s_start, t_ids, t_start) -> PairedExample:
    def one(ids, start):
        return SideExample(ids, [(0, 0)] * len(ids), [False] * len(ids), [i >= start for i in range(len(ids))], start)
    return PairedExample(one(s_ids, s_start), one(t_ids, t_start), "")


def test_mined_collate_and_loss(tmp_path, monkeypatch):
    monkeypatch.setenv("SRA_CACHE", str(tmp_path))
    s_tok, t_tok = word_tokenizer(STUDENT_WORDS, "s"), word_tokenizer(TEACHER_WORDS, "t")
    sv, tv = s_tok.get_vocab(), t_tok.get_vocab()
    # student: [cat] hello world <eos> ; teacher: [cats] hello world <eos>  (prompt is the first token)
    s_ids = [sv["cat"], sv["hello"], sv["world"], sv["<eos>"]]
    t_ids = [tv["cats"], tv["hello"], tv["world"], tv["<eos>"]]
    extras = MinEDLoss.collate_extras([_example(s_ids, 1, t_ids, 1)], s_tok, t_tok)
    assert extras[ALIGN_KEY].tolist() == [[-1, 1, 2, 3]]
    loss = MinEDLoss(MinEDConfig(temperature=1.0), s_tok, t_tok)
    batch = PairedBatch(side([s_ids], [1]), side([t_ids], [1]), torch.tensor([0]), extras)
    torch.manual_seed(0)
    s_logits = torch.randn(1, 4, len(s_tok), requires_grad=True)
    t_logits = torch.randn(1, 4, len(t_tok))
    out = loss(batch, view(s_logits), view(t_logits))
    # Reference: student id v takes the logit of the lowest teacher id mapped onto it, others -1e5.
    mapping = build_mined_map(s_tok, t_tok)
    total = 0.0
    for row in range(3):
        target = torch.full((len(s_tok),), -1e5)
        for t_id in reversed(range(len(t_tok))):
            target[mapping[t_id]] = t_logits[0, row, t_id]
        p = target.softmax(-1)
        total += (p * (p.clamp_min(1e-30).log() - s_logits[0, row].log_softmax(-1))).sum().item()
    assert out["distill"].item() == pytest.approx(total / 3, rel=1e-5)
    assert out["mined_aligned_fraction"].item() == 1.0
    out["distill"].backward()
    assert torch.isfinite(s_logits.grad).all()


def test_mined_identical_tokenizer_and_logits_is_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("SRA_CACHE", str(tmp_path))
    tok = word_tokenizer(STUDENT_WORDS, "s")
    ids = [2, 3, 4, 1]
    extras = MinEDLoss.collate_extras([_example(ids, 1, ids, 1)], tok, tok)
    batch = PairedBatch(side([ids], [1]), side([ids], [1]), torch.tensor([0]), extras)
    logits = torch.randn(1, 4, len(tok))
    out = MinEDLoss(MinEDConfig(), tok, tok)(batch, view(logits), view(logits))
    assert out["distill"].item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.slow
def test_mined_map_real_tokenizers_gpt2_smollm2(tmp_path, monkeypatch):
    from sra_distill.data.tokenization import load_tokenizer

    monkeypatch.setenv("SRA_CACHE", str(tmp_path))
    student, teacher = load_tokenizer("gpt2"), load_tokenizer("smollm2")
    mapping = build_mined_map(student, teacher)
    assert mapping.shape[0] == len(teacher.get_vocab()) and mapping.min() >= 0 and mapping.max() < len(student)
    for word in ("Ġhello", "Ġworld", "ing"):
        assert mapping[teacher.convert_tokens_to_ids(word)] == student.convert_tokens_to_ids(word)


# ---- DSKD -----------------------------------------------------------------------------------------------------


def test_dskd_matches_reference_and_has_gradients():
    torch.manual_seed(0)
    d_s, d_t, v_s, v_t = 8, 12, 20, 30
    s_ids, t_ids = [[3, 4, 5, 6, 7]], [[2, 9, 8, 11, 12, 13]]
    batch = PairedBatch(side(s_ids, [2]), side(t_ids, [3]), torch.tensor([0]))
    s_hidden = torch.randn(1, 5, d_s, requires_grad=True)
    s_head = torch.randn(v_s, d_s)
    s_logits = (s_hidden @ s_head.T).detach().requires_grad_(True)
    t_hidden, t_head, t_embed, s_embed = torch.randn(1, 6, d_t), torch.randn(v_t, d_t), torch.randn(v_t, d_t), torch.randn(v_s, d_s)
    t_logits = t_hidden @ t_head.T
    loss = DSKDLoss(DSKDConfig(temperature=2.0), d_s, d_t)
    student = ModelView({1: s_hidden}, {}, s_logits, s_head, None, 1, s_embed)
    teacher = ModelView({1: t_hidden}, {}, t_logits, t_head, None, 1, t_embed)
    out = loss(batch, student, teacher)

    # Plain reference over the response rows only (student rows 1..3, teacher rows 2..4).
    sr, tr = [1, 2, 3], [2, 3, 4]
    s_in, s_y = torch.tensor(s_ids[0])[sr], torch.tensor(s_ids[0])[[r + 1 for r in sr]]
    t_in, t_y = torch.tensor(t_ids[0])[tr], torch.tensor(t_ids[0])[[r + 1 for r in tr]]
    keys = torch.cat([t_embed[t_in], t_embed[t_y]], -1)
    keys = keys / keys.std()
    q = loss.query(torch.cat([s_embed[s_in], s_embed[s_y]], -1))
    a = (q @ keys.T / math.sqrt(2 * d_t))
    th = t_hidden[0, tr]
    tv = loss.t2s(th / th.std() + t_embed[t_y] / t_embed[t_y].std())
    t2s_logits = (a.softmax(-1) @ tv) @ s_head.T
    t2s_ce = F.cross_entropy(t2s_logits, s_y, reduction="sum") / 3
    hit = t2s_logits.argmax(-1).eq(s_y)
    kl = lambda z_s, z_t: (z_t.div(2).softmax(-1) * (z_t.div(2).log_softmax(-1) - z_s.div(2).log_softmax(-1))).sum(-1)  # noqa: E731
    t2s_kd = (kl(s_logits[0, sr], t2s_logits) * hit).sum() / 3
    s2t_logits = (a.T.softmax(-1) @ loss.s2t(s_hidden[0, sr])) @ t_head.T
    s2t_kd = kl(s2t_logits, t_logits[0, tr]).sum() / 3
    assert out["t2s_ce"].item() == pytest.approx(t2s_ce.item(), rel=1e-4)
    assert out["t2s_kd"].item() == pytest.approx(t2s_kd.item(), rel=1e-4, abs=1e-6)
    assert out["s2t_kd"].item() == pytest.approx(s2t_kd.item(), rel=1e-4)
    assert out["t2s_acc"].item() == pytest.approx(hit.float().mean().item())
    assert 0.0 <= out["s2t_acc"].item() <= 1.0
    assert out["distill"].item() == pytest.approx((t2s_ce + t2s_kd + s2t_kd).item(), rel=1e-4)

    out["distill"].backward()
    for name, grad in [("hidden", s_hidden.grad), ("query", loss.query.weight.grad),
                       ("s2t", loss.s2t.weight.grad), ("t2s", loss.t2s.weight.grad)]:
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert torch.isfinite(s_logits.grad).all()


def test_dskd_requires_input_embeddings():
    batch = PairedBatch(side([[1, 2, 3]], [1]), side([[1, 2, 3]], [1]), torch.tensor([0]))
    v = view(torch.randn(1, 3, 5))
    with pytest.raises(ValueError, match="input embeddings"):
        DSKDLoss(DSKDConfig(), 4, 4)(batch, v, v)
    assert DSKDConfig().projector_lr == pytest.approx(1e-3)


# ---- MultiLevelOT ---------------------------------------------------------------------------------------------


def test_sinkhorn_cost_against_plain_iterations():
    cost = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 1.5]])
    eps = 0.5
    k = torch.exp(-cost / eps).double()
    a, b = torch.full((2,), 1 / 2).double(), torch.full((3,), 1 / 3).double()
    u, v = torch.ones(2).double(), torch.ones(3).double()
    for _ in range(200):
        u = a / (k @ v)
        v = b / (k.T @ u)
    plan = u[:, None] * k * v[None]
    assert sinkhorn_cost(cost, eps, 200).item() == pytest.approx((plan * cost).sum().item(), rel=1e-5)


def test_multilevel_ot_values_identity_and_gradients():
    torch.manual_seed(0)
    cfg = MultiLevelOTConfig(top_k=4)
    s_logits = torch.randn(2, 5, 7, requires_grad=True)
    t_logits = torch.randn(2, 6, 9)
    batch = PairedBatch(side([[1, 2, 3, 4, 5], [1, 2, 3]], [2, 1]), side([[1] * 6, [1, 2, 3, 4]], [2, 1]),
                        torch.tensor([0, 0]))
    loss = MultiLevelOTLoss(cfg)
    out = loss(batch, view(s_logits), view(t_logits))

    def trunc(rows):  # std-scaled softmax, columns sorted by total mass, top 4
        p = (rows / (rows.std(-1, keepdim=True) + 1e-4)).softmax(-1)
        return p[:, p.sum(0).argsort(descending=True)[:4]]

    had = []
    for b, (sr, tr) in enumerate([([1, 2, 3], [1, 2, 3, 4]), ([0, 1], [0, 1, 2])]):
        s, t = trunc(s_logits[b, sr].detach()), trunc(t_logits[b, tr])
        had.append((s - t[: len(s)]).abs().sum(-1).mean().item())
    assert out["ot_had"].item() == pytest.approx(np.mean(had), rel=1e-5)
    expected = out["ot_had"] + 0.1 * out["ot_log"] + 0.1 * out["ot_sinkhorn"]
    assert out["distill"].item() == pytest.approx(expected.item(), rel=1e-5)
    out["distill"].backward()
    assert torch.isfinite(s_logits.grad).all() and s_logits.grad.abs().sum() > 0

    same = loss(PairedBatch(batch.student, batch.student, batch.num_spans), view(s_logits.detach()), view(s_logits.detach()))
    assert same["ot_had"].item() == pytest.approx(0.0, abs=1e-6)
