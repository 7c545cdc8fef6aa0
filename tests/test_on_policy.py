"""On-policy distillation on the tiny pair: step choice, generation, re-pairing, degenerate answers, the engine hook
(CE scale, metrics, every method, grad accumulation, LoRA, many processes) and exact resume."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sra_distill.config import ArchSettings, ConfigError, load_config
from sra_distill.data.collate import PairedCollator
from sra_distill.data.pairing import pair_example
from sra_distill.data.records import Record
from sra_distill.data.tokenization import load_tokenizer
from sra_distill.evaluation.plots import NOT_CURVES
from sra_distill.models.load import random_model
from sra_distill.train.engine import Trainer
from sra_distill.train.on_policy import (
    METRIC_KEYS,
    Generation,
    OnPolicyDistiller,
    degenerate_kind,
    generate_responses,
    is_on_policy_step,
    pair_generation,
    sampling_seed,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "src/sra_distill/configs/tiny.yaml"
PROMPT = "### Instruction:\nName a colour.\n\n### Response:\n"


@pytest.fixture(scope="module")
def tokenizers():
    return load_tokenizer("gpt2"), load_tokenizer("llama2")


@pytest.fixture(scope="module")
def student(tokenizers):
    arch = ArchSettings(hidden_size=32, num_layers=2, num_heads=4, max_positions=256, dropout=0.0)
    return random_model("gpt2", arch, tokenizers[0], seed=0).eval()


def rows(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def run(output_dir, *overrides):
    return Trainer(load_config(TINY, [f"output_dir={output_dir}", *overrides])).train()


# --------------------------------------------------------------------------------------------- choice of steps

def test_on_policy_steps_are_spread_evenly_at_the_ratio():
    assert not any(is_on_policy_step(s, 0.0) for s in range(200))
    assert all(is_on_policy_step(s, 1.0) for s in range(200))
    assert [is_on_policy_step(s, 0.5) for s in range(6)] == [False, True, False, True, False, True]
    for ratio in (0.1, 0.25, 0.3, 0.5, 2 / 3, 0.9):
        chosen = [is_on_policy_step(s, ratio) for s in range(500)]
        assert not chosen[0]  # the first step reads the data
        for n in range(1, 501):  # any run's first n steps: the ratio's share, to one step
            assert abs(sum(chosen[:n]) - n * ratio) < 1 + 1e-9, (ratio, n)
        # no two on-policy steps in a row below 0.5, and never a longer off-policy gap than the ratio implies
        gaps = np.diff([s for s, on in enumerate(chosen) if on])
        assert gaps.min() >= math.floor(1 / ratio) and gaps.max() <= math.ceil(1 / ratio)


def test_sampling_seeds_differ_per_process_and_micro_batch():
    seeds = {sampling_seed(42, step, process, micro) for step in range(3) for process in range(2) for micro in range(2)}
    assert len(seeds) == 12


# --------------------------------------------------------------------------------------------- generation

def test_greedy_batch_generation_matches_one_prompt_at_a_time(student, tokenizers):
    tok = tokenizers[0]
    prompts = [tok(PROMPT)["input_ids"], tok("Say hi.\n")["input_ids"], tok("A")["input_ids"]]
    batch = generate_responses(student, tok, prompts, max_new_tokens=6, temperature=0.0, top_p=1.0, seed=1)
    for prompt, got in zip(prompts, batch):
        out = student.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                               max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
        expected = out[0, len(prompt):].tolist()
        if tok.eos_token_id in expected:
            expected = expected[: expected.index(tok.eos_token_id)]
        assert got.token_ids == expected
        assert got.finished == (len(expected) < 6)
        assert got.text == tok.decode(expected, skip_special_tokens=True)


def test_sampling_is_seeded_leaves_the_training_rng_alone_and_restores_train_mode(student, tokenizers):
    tok = tokenizers[0]
    prompts = [tok(PROMPT)["input_ids"]] * 3
    student.train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = generate_responses(student, tok, prompts, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert student.training
    second = generate_responses(student, tok, prompts, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    other = generate_responses(student, tok, prompts, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=8)
    student.eval()
    assert [g.token_ids for g in first] == [g.token_ids for g in second]
    assert [g.token_ids for g in first] != [g.token_ids for g in other]
    assert all(len(g.token_ids) <= 12 for g in first)
    # A random model over 50k tokens: three samples of the same prompt differ.
    assert len({tuple(g.token_ids) for g in first}) == 3


# --------------------------------------------------------------------------------------------- re-pairing

@pytest.mark.parametrize("text", ["Red, like a ripe tomato.", "Café au lait 🙂 — naïve", "  two leading spaces\n"])
def test_a_finished_generation_pairs_exactly_like_a_dataset_record(tokenizers, text):
    s_tok, t_tok = tokenizers
    record = Record(PROMPT, text, [text], None, "test", 1)
    expected = pair_example(record, s_tok, t_tok, max_length=128, max_prompt_length=64)
    prompts = [expected.student.input_ids[: expected.student.response_start],
               expected.teacher.input_ids[: expected.teacher.response_start]]
    got = pair_generation(*prompts, Generation([1], True, text), s_tok, t_tok, 128)
    assert got.response == expected.response
    for side in ("student", "teacher"):
        a, b = getattr(got, side), getattr(expected, side)
        assert a.input_ids == b.input_ids and a.is_target == b.is_target and a.special == b.special
        assert a.response_start == b.response_start
        assert a.offsets.tolist() == b.offsets.tolist()


def test_a_generation_cut_by_the_length_limit_gets_no_eos_on_either_side(tokenizers):
    s_tok, t_tok = tokenizers
    got = pair_generation(s_tok(PROMPT)["input_ids"], t_tok(PROMPT)["input_ids"], Generation([1], False, "Red and"),
                          s_tok, t_tok, 128)
    for side, tok in ((got.student, s_tok), (got.teacher, t_tok)):
        assert side.input_ids[-1] != tok.eos_token_id
        assert all(side.is_target[side.response_start:]) and not any(side.is_target[: side.response_start])


def test_degenerate_kinds():
    assert degenerate_kind(Generation([], True, ""), 0) == "eos_only"
    assert degenerate_kind(Generation([220, 220], False, "  "), 1) == "empty"
    assert degenerate_kind(Generation([16], True, "1820"), 0) == "no_spans"
    assert degenerate_kind(Generation([16], True, "Red"), 1) is None


class _FakeAccelerator:
    device = torch.device("cpu")
    process_index = 0

    @staticmethod
    def autocast():
        return torch.autocast("cpu", enabled=False)

    @staticmethod
    def gather(tensor):
        return tensor


def _dataset_batch(tokenizers, collator, texts):
    s_tok, t_tok = tokenizers
    examples = [pair_example(Record(PROMPT + str(i), t, [t], None, "test", i), s_tok, t_tok, 128, 64)
                for i, t in enumerate(texts)]
    return collator(examples)


def test_degenerate_generations_are_dropped_and_counted_and_an_all_degenerate_batch_falls_back(
        tokenizers, monkeypatch):
    s_tok, t_tok = tokenizers
    collator = PairedCollator.for_tokenizers(s_tok, t_tok)
    cfg = load_config(TINY, ["on_policy.ratio=1"])
    distiller = OnPolicyDistiller.from_config(cfg, s_tok, t_tok, collator, _FakeAccelerator(), student_fsdp=False)
    batch = _dataset_batch(tokenizers, collator, ["a", "b", "c", "d"])
    answers = [Generation([], True, ""), Generation([220], False, " "), Generation([1], True, "Blue sky."),
               Generation([2], False, "Green")]
    monkeypatch.setattr("sra_distill.train.on_policy.generate_responses", lambda *a, **k: answers)
    group, scales, metrics = distiller.prepare([batch], step=0, model=None)
    assert scales == [0.0]  # CE on generated text is off by default
    assert metrics["on_policy"] is True and metrics["degenerate"] == 2
    assert metrics["degenerate_eos_only"] == 1 and metrics["degenerate_empty"] == 1
    assert metrics["generated_tokens"] == pytest.approx(3 / 4)
    expected = collator([pair_generation(
        batch.student.input_ids[b, : batch.student.response_start[b]].tolist(),
        batch.teacher.input_ids[b, : batch.teacher.response_start[b]].tolist(), answers[b], s_tok, t_tok, 128)
        for b in (2, 3)])
    assert torch.equal(group[0].student.input_ids, expected.student.input_ids)
    assert torch.equal(group[0].teacher.span_ids, expected.teacher.span_ids)
    assert torch.equal(group[0].num_spans, expected.num_spans) and bool((group[0].num_spans > 0).all())

    monkeypatch.setattr("sra_distill.train.on_policy.generate_responses", lambda *a, **k: answers[:2] * 2)
    group, scales, metrics = distiller.prepare([batch], step=0, model=None)
    assert group[0] is batch and scales == [1.0]
    assert metrics["on_policy_fallback_batches"] == 1 and metrics["degenerate"] == 4


def test_settings_that_cannot_work_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="on_policy"):
        load_config(TINY, ["on_policy.ratio=1.5"])
    with pytest.raises(ConfigError, match="on_policy"):
        load_config(TINY, ["on_policy.top_p=0"])
    with pytest.raises(ConfigError, match="needs a teacher"):
        Trainer(load_config(TINY, [f"output_dir={tmp_path}", "method=sft", "on_policy.ratio=0.5"]))
    cfg = load_config(TINY, ["on_policy.ratio=0.5"])
    with pytest.raises(ConfigError, match="FSDP student"):
        OnPolicyDistiller.from_config(cfg, None, None, None, None, student_fsdp=True)
    assert OnPolicyDistiller.from_config(load_config(TINY, []), None, None, None, None,
                                         student_fsdp=True) is None  # off: nothing to refuse


def test_plots_leave_the_on_policy_counters_out_of_the_loss_panel():
    assert set(METRIC_KEYS) <= NOT_CURVES


# --------------------------------------------------------------------------------------------- engine

def test_every_step_on_policy_trains_without_ce_and_logs_generation(tmp_path):
    result = run(tmp_path, "on_policy.ratio=1", "on_policy.max_new_tokens=8", "max_steps=2")
    got = rows(result.output_dir)
    assert [r["step"] for r in got] == [1, 2]
    for r in got:
        assert r["on_policy"] is True
        assert r["generation_s"] > 0 and 0 < r["generated_tokens"] <= 8
        assert r["loss"] == pytest.approx(0.5 * r["distill"], rel=1e-5)  # alpha 0.5, CE left out
        assert r["degenerate"] == r["degenerate_eos_only"] + r["degenerate_empty"] + r["degenerate_no_spans"]


def test_ce_on_generated_text_is_a_setting(tmp_path):
    result = run(tmp_path, "on_policy.ratio=1", "on_policy.max_new_tokens=8", "max_steps=1",
                 "on_policy.ce_on_generated=true")
    (r,) = rows(result.output_dir)
    assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["distill"], rel=1e-5)


def test_ratio_zero_is_the_off_policy_engine(tmp_path):
    off = rows(run(tmp_path / "off", "max_steps=2").output_dir)
    zero = rows(run(tmp_path / "zero", "max_steps=2", "on_policy.ratio=0").output_dir)
    for a, b in zip(off, zero):
        assert "on_policy" not in b
        for key in ("loss", "ce", "distill", "grad_norm"):
            assert a[key] == b[key]


@pytest.mark.slow
def test_mixed_ratio_follows_the_even_schedule(tmp_path):
    cfg = load_config(TINY, [f"output_dir={tmp_path}", "on_policy.ratio=0.5", "on_policy.max_new_tokens=4"])
    got = rows(Trainer(cfg).train().output_dir)
    assert [r["on_policy"] for r in got] == [False, True, False, True] == [is_on_policy_step(s, 0.5) for s in range(4)]
    assert all(("generation_s" in r) == r["on_policy"] for r in got)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sra", "uld", "mined", "dskd", "multilevel_ot"])
def test_every_cross_tokenizer_method_trains_on_policy(tmp_path, method):
    (r,) = rows(run(tmp_path, f"method={method}", "on_policy.ratio=1", "on_policy.max_new_tokens=8",
                    "max_steps=1").output_dir)
    assert r["on_policy"] is True and r["on_policy_fallback_batches"] == 0
    assert torch.isfinite(torch.tensor([r["loss"], r["distill"], r["grad_norm"]])).all()
    assert r["loss"] == pytest.approx(0.5 * r["distill"], rel=1e-5)


GREEDY = ["on_policy.ratio=1", "on_policy.temperature=0", "on_policy.max_new_tokens=8", "student_arch.dropout=0",
          "max_steps=2"]
COMPARED = ("loss", "ce", "distill", "cos", "geo", "kl", "grad_norm", "generated_tokens")


def assert_same(got_dir, expected_dir):
    expected = {r["step"]: r for r in rows(expected_dir)}
    for r in rows(got_dir):
        for key in COMPARED:
            assert r[key] == pytest.approx(expected[r["step"]][key], rel=1e-4, abs=1e-6), (r["step"], key)
    a = load_file(Path(expected_dir) / "final" / "model.safetensors")
    b = load_file(Path(got_dir) / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.slow
def test_greedy_on_policy_with_grad_accumulation_matches_the_larger_batch(tmp_path):
    # Greedy answers do not depend on how prompts are grouped, so 2 micro-batches of 2 = one batch of 4.
    big = run(tmp_path / "big", *GREEDY, "batch_size=4")
    accumulated = run(tmp_path / "acc", *GREEDY, "batch_size=2", "grad_accum=2")
    assert_same(accumulated.output_dir, big.output_dir)


@pytest.mark.slow
def test_greedy_on_policy_on_two_processes_matches_one_process(tmp_path):
    from test_distributed import torchrun_distill

    one = run(tmp_path / "one", *GREEDY, "batch_size=4", "max_train_examples=16")
    two = tmp_path / "two"
    torchrun_distill(two, *GREEDY, "batch_size=2", "max_steps=2")
    assert_same(two, one.output_dir)
    assert [r["generated_tokens"] for r in rows(two)] == [r["generated_tokens"] for r in rows(one.output_dir)]


@pytest.mark.slow
def test_lora_student_trains_on_policy(tmp_path):
    result = run(tmp_path, "on_policy.ratio=1", "on_policy.max_new_tokens=8", "max_steps=2", "lora.enabled=true",
                 "lora.r=4", "lora.alpha=8")
    got = rows(result.output_dir)
    assert all(r["on_policy"] for r in got) and all(torch.isfinite(torch.tensor(r["loss"])) for r in got)
    assert got[0]["loss"] != got[1]["loss"]
    assert (result.final_dir / "model.safetensors").exists()  # merged on save


@pytest.mark.slow
def test_resume_after_a_stop_reproduces_the_uninterrupted_on_policy_run(tmp_path):
    settings = ["on_policy.ratio=0.5", "on_policy.max_new_tokens=8", "save_every=2", "keep_last=5"]
    full = run(tmp_path / "full", *settings)
    flags = [r["on_policy"] for r in rows(full.output_dir)]
    assert any(flags[2:]) and not all(flags)  # the resumed part has on-policy steps; the run mixes
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(full.output_dir / "checkpoints" / "step-2", resumed_dir / "checkpoints" / "step-2")
    resumed = run(resumed_dir, *settings, "resume=true")
    expected = {r["step"]: r for r in rows(full.output_dir)}
    got = rows(resumed.output_dir)
    assert [r["step"] for r in got] == [3, 4]
    for r in got:
        assert r["on_policy"] == expected[r["step"]]["on_policy"]
        for key in ("loss", "ce", "distill", "grad_norm", *(("generated_tokens",) if r["on_policy"] else ())):
            assert r[key] == pytest.approx(expected[r["step"]][key], rel=1e-5, abs=1e-6), key
    a = load_file(full.final_dir / "model.safetensors")
    b = load_file(resumed.final_dir / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
