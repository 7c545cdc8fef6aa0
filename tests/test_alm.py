"""ALM (`losses/alm.py`): values and gradients against a plain per-sample, per-chunk loop; chunks at position 0, samples
without spans and padding; the word-start masks of real tokenizers; one short `sra distill method=alm` run."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from sra_distill.cli import main
from sra_distill.config import ConfigError, load_config
from sra_distill.data.batch import IGNORE_INDEX, ModelView, PairedBatch, SideBatch
from sra_distill.data.tokenization import load_tokenizer
from sra_distill.losses.alm import EPSILON, ALMConfig, ALMLoss, word_start_mask
from sra_distill.paths import CONFIGS_DIR
from sra_distill.validation import check_combinations

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = CONFIGS_DIR / "tiny.yaml"
VOCAB_S, VOCAB_T = 11, 13


def side(span_rows: list[list[int]], vocab: int, generator: torch.Generator, pad_to: int | None = None) -> SideBatch:
    """A right-padded side whose tokens are random ids; span_rows give each real token's span id (-1: none)."""
    width = pad_to or max(len(r) for r in span_rows)
    span_ids = torch.tensor([r + [-1] * (width - len(r)) for r in span_rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in span_rows])
    input_ids = torch.randint(0, vocab, span_ids.shape, generator=generator) * attention
    labels = torch.where(span_ids >= 0, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return SideBatch(input_ids, attention, labels, span_ids, torch.zeros(len(span_rows), dtype=torch.long))


def first_sample(part: SideBatch) -> SideBatch:
    return SideBatch(*(tensor[:1] for tensor in dataclasses.astuple(part)))


def view(logits: torch.Tensor) -> ModelView:
    return ModelView(hidden={}, attention_row={}, logits=logits, lm_head_weight=torch.zeros(logits.shape[-1], 1))


def reference_alm(batch: PairedBatch, student_logits, teacher_logits, student_ws, teacher_ws, config: ALMConfig):
    """(loss, groups) by plain loops in float64: per sample, per chunk, then the merge as a running sum."""
    tau, theta = config.binarization_temperature, config.merge_threshold
    losses = []
    for b in range(batch.batch_size):
        chunks = []
        for k in range(int(batch.num_spans[b])):
            sides = []
            for logits, part, ws in ((student_logits, batch.student, student_ws),
                                     (teacher_logits, batch.teacher, teacher_ws)):
                positions = [t for t in range(part.span_ids.shape[1]) if int(part.span_ids[b, t]) == k]
                if not positions or positions[0] == 0:
                    break
                log_p = sum(torch.log_softmax(logits[b, t - 1].double(), -1)[part.input_ids[b, t]] for t in positions)
                log_q = torch.logsumexp(torch.log_softmax(logits[b, positions[-1]].double(), -1)[ws], -1)
                sides.append((log_p, log_q))
            if len(sides) == 2:
                chunks.append(sides)
        sum_s = sum_t = 0.0
        for i, ((s_p, s_q), (t_p, t_q)) in enumerate(chunks):
            sum_s, sum_t = sum_s + s_p, sum_t + t_p
            if i == len(chunks) - 1 or theta == 0 or math.exp(float(t_q)) > theta:
                if config.debias:
                    sum_s, sum_t = sum_s + s_q, sum_t + t_q
                a, s = sum_t / tau - EPSILON, sum_s / tau - EPSILON
                losses.append(-(torch.exp(a) * s + (1 - torch.exp(a)) * torch.log(1 - torch.exp(s))))
                sum_s = sum_t = 0.0
    total = sum(losses) if losses else student_logits.double().sum() * 0
    return total / max(len(losses), 1), len(losses)


def random_case(seed: int, student_spans, teacher_spans, num_spans, scale: float = 3.0, pad_to=(None, None)):
    """A batch with random ids and logits (scaled for a wide spread of probabilities) and sparse word-start masks."""
    g = torch.Generator().manual_seed(seed)
    student, teacher = side(student_spans, VOCAB_S, g, pad_to[0]), side(teacher_spans, VOCAB_T, g, pad_to[1])
    batch = PairedBatch(student, teacher, torch.tensor(num_spans))
    s_logits = (scale * torch.randn(*student.input_ids.shape, VOCAB_S, generator=g)).requires_grad_(True)
    t_logits = scale * torch.randn(*teacher.input_ids.shape, VOCAB_T, generator=g)
    s_ws = torch.zeros(VOCAB_S, dtype=torch.bool)
    s_ws[[1, 4, 7]] = True
    t_ws = torch.zeros(VOCAB_T, dtype=torch.bool)
    t_ws[[0, 5, 9, 12]] = True
    return batch, s_logits, t_logits, s_ws, t_ws


# Two samples, different lengths and tokenizations of 5 and 3 spans; the student's prompt is longer.
STUDENT_SPANS = [[-1, -1, -1, 0, 0, 1, 2, 2, 2, 3, 4, -1], [-1, -1, 0, 1, 1, 2]]
TEACHER_SPANS = [[-1, -1, 0, 1, 1, 2, 3, 3, 4, 4], [-1, 0, 0, 1, 2, 2, 2]]


@pytest.mark.parametrize("tau, theta, debias", [(100.0, 0.1, True), (100.0, 0.0, True), (1.0, 0.5, True),
                                                (1.0, 0.5, False), (10.0, 0.9, True)])
def test_matches_the_reference_loop_in_value_and_gradient(tau, theta, debias):
    config = ALMConfig(binarization_temperature=tau, merge_threshold=theta, debias=debias)
    batch, s_logits, t_logits, s_ws, t_ws = random_case(0, STUDENT_SPANS, TEACHER_SPANS, [5, 3])
    out = ALMLoss(config, s_ws, t_ws)(batch, view(s_logits), view(t_logits))
    (grad,) = torch.autograd.grad(out["distill"], s_logits)
    expected, groups = reference_alm(batch, s_logits, t_logits, s_ws, t_ws, config)
    (expected_grad,) = torch.autograd.grad(expected, s_logits)
    assert out["alm_chunks"].item() == groups
    if theta in (0.0, 0.9):  # every chunk its own group / nearly all merged: both extremes are exercised
        assert (groups == 8) == (theta == 0.0)
    torch.testing.assert_close(out["distill"].double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=1e-4, atol=1e-8)
    assert grad.abs().sum() > 0 and out["alm"].requires_grad is False


def test_merging_joins_chunks_until_the_teacher_expects_a_new_word():
    """With theta = 0.5 some chunks close their group and some do not: fewer groups than chunks, more than samples."""
    config = ALMConfig(merge_threshold=0.5)
    batch, s_logits, t_logits, s_ws, t_ws = random_case(0, STUDENT_SPANS, TEACHER_SPANS, [5, 3])
    out = ALMLoss(config, s_ws, t_ws)(batch, view(s_logits), view(t_logits))
    assert 2 < out["alm_chunks"].item() < 8


def test_a_chunk_at_position_zero_is_left_out_on_both_sides():
    """Token 0 has no logits row that predicts it: the chunk holding it is not scored, as if absent."""
    config = ALMConfig(merge_threshold=0.0)
    spans_at_zero = [[0, 1, 1, 2], [-1, 0, 1]]
    batch, s_logits, t_logits, s_ws, t_ws = random_case(1, spans_at_zero, [[-1, 0, 1, 1, 2], [-1, 0, 0, 1]], [3, 2])
    out = ALMLoss(config, s_ws, t_ws)(batch, view(s_logits), view(t_logits))
    expected, groups = reference_alm(batch, s_logits, t_logits, s_ws, t_ws, config)
    assert groups == 4 and out["alm_chunks"].item() == 4  # 5 chunks, the first sample's chunk 0 left out
    torch.testing.assert_close(out["distill"].double(), expected, rtol=1e-5, atol=1e-7)


def test_a_sample_without_spans_adds_nothing_and_a_batch_without_any_is_zero():
    config = ALMConfig()
    batch, s_logits, t_logits, s_ws, t_ws = random_case(2, [[-1, -1, 0, 1, 1], [-1, -1, -1]],
                                                        [[-1, 0, 0, 1], [-1, -1, -1, -1]], [2, 0])
    loss = ALMLoss(config, s_ws, t_ws)
    both = loss(batch, view(s_logits), view(t_logits))
    first_only = PairedBatch(first_sample(batch.student), first_sample(batch.teacher), batch.num_spans[:1])
    first = loss(first_only, view(s_logits[:1]), view(t_logits[:1]))
    torch.testing.assert_close(both["distill"], first["distill"])
    assert both["alm_chunks"].item() == first["alm_chunks"].item() > 0

    empty, s_empty, t_empty, _, _ = random_case(3, [[-1, -1, -1]], [[-1, -1]], [0])
    out = loss(empty, view(s_empty), view(t_empty))
    assert out["distill"].item() == 0.0 and out["alm_chunks"].item() == 0
    out["distill"].backward()  # still part of the graph: the engine backpropagates it as any other batch
    assert s_empty.grad is not None and s_empty.grad.abs().sum() == 0


def test_padding_changes_nothing():
    """More pad columns (with their own random logits) on either side give the same loss and gradient."""
    config = ALMConfig(merge_threshold=0.5)
    tight = random_case(4, STUDENT_SPANS, TEACHER_SPANS, [5, 3])
    padded = random_case(4, STUDENT_SPANS, TEACHER_SPANS, [5, 3], pad_to=(15, 12))
    batch, s_logits, t_logits, s_ws, t_ws = padded
    with torch.no_grad():  # the same ids and logits at the real positions; only the pad columns differ
        t_logits[:, :tight[2].shape[1]] = tight[2]
        s_logits[:, :tight[1].shape[1]] = tight[1]
    batch.student.input_ids[:, :tight[0].student.input_ids.shape[1]] = tight[0].student.input_ids
    batch.teacher.input_ids[:, :tight[0].teacher.input_ids.shape[1]] = tight[0].teacher.input_ids
    loss = ALMLoss(config, s_ws, t_ws)
    a = loss(tight[0], view(tight[1]), view(tight[2]))["distill"]
    b = loss(batch, view(s_logits), view(t_logits))["distill"]
    torch.testing.assert_close(a, b)
    (grad_a,), (grad_b,) = torch.autograd.grad(a, tight[1]), torch.autograd.grad(b, s_logits)
    torch.testing.assert_close(grad_b[:, :grad_a.shape[1]], grad_a)
    assert grad_b[:, grad_a.shape[1]:].abs().sum() == 0


def test_a_student_equal_to_its_teacher_has_no_gradient():
    """Binary cross-entropy is lowest where the student's chunk likelihoods are the teacher's."""
    g = torch.Generator().manual_seed(5)
    part = side(TEACHER_SPANS, VOCAB_T, g)
    batch = PairedBatch(part, part, torch.tensor([5, 3]))
    logits = 3 * torch.randn(*part.input_ids.shape, VOCAB_T, generator=g)
    ws = torch.zeros(VOCAB_T, dtype=torch.bool)
    ws[[0, 5]] = True
    student = logits.clone().requires_grad_(True)
    out = ALMLoss(ALMConfig(binarization_temperature=1.0), ws, ws)(batch, view(student), view(logits))
    (grad,) = torch.autograd.grad(out["distill"], student)
    assert out["distill"].item() > 0  # the teacher's binary entropy: a cross-entropy, not a KL
    assert grad.abs().max() < 1e-6


def test_word_start_masks_of_real_tokenizers(gpt2_tok):
    gpt2 = word_start_mask(gpt2_tok, len(gpt2_tok) + 3)  # padded head rows: no token, never a word start
    ids = gpt2_tok.convert_tokens_to_ids
    assert gpt2[[ids("Ġthe"), ids("Ċ"), ids("ĉ"), gpt2_tok.eos_token_id]].all()
    assert not gpt2[[ids("the"), ids("ing"), len(gpt2_tok)]].any()
    llama = load_tokenizer("llama2")
    llama_mask = word_start_mask(llama, 32000)
    ids = llama.convert_tokens_to_ids
    assert llama_mask[[ids("▁the"), ids("<0x0A>"), ids("<0x09>"), ids("<0x20>"), llama.eos_token_id]].all()
    assert not llama_mask[[ids("the"), ids("ing"), ids("<0x41>")]].any()


def test_defaults_are_tokenkits_and_bad_settings_are_refused():
    cfg = load_config(None, ["method=alm"]).methods.alm
    assert (cfg.binarization_temperature, cfg.merge_threshold, cfg.debias) == (100.0, 0.1, True)
    with pytest.raises(ConfigError, match=r"methods.alm.binarization_temperature: must be > 0"):
        load_config(None, ["method=alm", "methods.alm.binarization_temperature=0"])
    with pytest.raises(ConfigError, match=r"methods.alm.merge_threshold: must be in \[0, 1\)"):
        load_config(None, ["method=alm", "methods.alm.merge_threshold=1"])


def test_sra_distill_method_alm_runs_end_to_end(tmp_path):
    small = ["max_train_examples=4", "batch_size=2", "max_length=64", "max_prompt_length=32"]
    assert main(["distill", "--config", str(TINY), f"output_dir={tmp_path}", "method=alm", "max_steps=2",
                 *small]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["alm_chunks"] > 0 and math.isfinite(r["distill"]) and math.isfinite(r["grad_norm"])
        assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["distill"], rel=1e-5)
    assert (tmp_path / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("method", ["alm", "sra"])  # sra: its fused CE + span KL node under the probes' backward
def test_gradmag_balance_is_alpha_per_step_from_the_gradient_norms(tmp_path, method):
    """tokenkit trains ALM next to the CE with GradMag: one step with balance=gradmag logs the alpha it used, and
    equals a step with that alpha fixed (same weights after the step)."""
    small = ["max_train_examples=2", "batch_size=2", "max_length=64", "max_prompt_length=32", "max_steps=1",
             f"method={method}", "student_arch.dropout=0"]
    assert main(["distill", "--config", str(TINY), f"output_dir={tmp_path / 'gradmag'}", "balance=gradmag",
                 *small]) == 0
    row = json.loads((tmp_path / "gradmag" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.0 < row["alpha"] < 1.0 and row["alpha"] != 0.5
    assert row["loss"] == pytest.approx(row["alpha"] * row["ce"] + (1 - row["alpha"]) * row["distill"], rel=1e-5)
    assert main(["distill", "--config", str(TINY), f"output_dir={tmp_path / 'fixed'}", f"alpha={row['alpha']!r}",
                 *small]) == 0
    balanced = load_file(tmp_path / "gradmag" / "final" / "model.safetensors")
    fixed = load_file(tmp_path / "fixed" / "final" / "model.safetensors")
    # The logged alpha is rounded to float32 and SRA's KL gradient is recomputed after the probes: float rounding,
    # which Adam's first step (~lr * sign(g)) turns into up to ~1e-6 where a gradient is near its eps. A wrong mix
    # would move weights by ~lr = 1e-3.
    for name, value in balanced.items():
        torch.testing.assert_close(value, fixed[name], rtol=0, atol=1e-5, msg=name)


def test_gradmag_needs_a_distillation_term():
    with pytest.raises(ConfigError, match="balance=gradmag with method=sft"):
        check_combinations(load_config(None, ["method=sft", "balance=gradmag"]))
    with pytest.raises(ConfigError, match="balance: expected one of alpha, gradmag"):
        load_config(None, ["balance=magic"])
