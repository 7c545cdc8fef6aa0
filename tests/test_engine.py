"""End to end on the tiny config: finite falling loss, exact resume, a final student that reloads and generates."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sra_distill.config import load_config
from sra_distill.run_files import list_checkpoints
from sra_distill.train.engine import Trainer, lr_lambda

TINY = Path(__file__).resolve().parents[1] / "src/sra_distill/configs/tiny.yaml"


def run(tmp_path, *overrides):
    cfg = load_config(TINY, [f"output_dir={tmp_path}", *overrides])
    return Trainer(cfg).train()


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_tiny_run_writes_metrics_final_student_and_plot(tmp_path):
    result = run(tmp_path)
    metrics = rows(result.metrics_path)
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    for r in metrics:
        for key in ("loss", "ce", "distill", "cos", "geo", "kl", "lr", "tokens_per_s", "world_size"):
            assert key in r, key
        assert torch.isfinite(torch.tensor(r["loss"]))
        assert r["world_size"] == 1
    assert result.plot_path.exists() and result.plot_path.stat().st_size > 1000
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.final_dir)
    enc = tokenizer("### Instruction:\nSay hi\n\n### Response:\n", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == enc["input_ids"].shape[1] + 5


@pytest.mark.slow
def test_loss_falls_when_overfitting_a_handful_of_examples(tmp_path):
    result = run(tmp_path, "max_train_examples=4", "max_steps=25", "lr=3e-3", "warmup_steps=0", "min_lr_ratio=1.0")
    losses = [r["loss"] for r in rows(result.metrics_path)]
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = run(tmp_path / "full", "save_every=2", "keep_last=5")
    assert [step for step, _ in list_checkpoints(full.output_dir)] == [2, 4]
    # A run that stopped after its step-2 checkpoint: same config, only that checkpoint on disk, then resume.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(full.output_dir / "checkpoints" / "step-2", resumed_dir / "checkpoints" / "step-2")
    resumed = run(resumed_dir, "save_every=2", "keep_last=5", "resume=true")
    expected = {r["step"]: r for r in rows(full.metrics_path)}
    got = rows(resumed.metrics_path)
    assert [r["step"] for r in got] == [3, 4]
    for r in got:
        for key in ("loss", "ce", "cos", "geo", "kl", "lr"):
            assert r[key] == pytest.approx(expected[r["step"]][key], rel=1e-5, abs=1e-6), key
    a = AutoModelForCausalLM.from_pretrained(full.final_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed.final_dir).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_schedule_warms_up_then_decays_to_the_floor():
    f = lr_lambda(total_steps=10, warmup_steps=2, min_ratio=0.1)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0)
    assert f(2) == pytest.approx(1.0)
    assert f(10) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(2, 12))


@pytest.mark.slow
def test_keep_last_prunes_old_checkpoints_and_zero_keeps_all(tmp_path):
    pruned = run(tmp_path / "pruned", "max_steps=3", "save_every=1", "keep_last=2")
    assert [step for step, _ in list_checkpoints(pruned.output_dir)] == [2, 3]
    kept = run(tmp_path / "kept", "max_steps=3", "save_every=1", "keep_last=0")
    assert [step for step, _ in list_checkpoints(kept.output_dir)] == [1, 2, 3]


def test_sft_loads_no_teacher_and_tokenises_the_student_side_only(tmp_path, monkeypatch):
    import sra_distill.train.engine as engine_module

    loaded = []
    real_load = engine_module.load_model
    monkeypatch.setattr(engine_module, "load_model", lambda source, **kw: loaded.append(source) or real_load(source, **kw))
    trainer = Trainer(load_config(TINY, [f"output_dir={tmp_path}", "method=sft", "max_steps=2"]))
    assert loaded == ["random:gpt2"] and trainer.teacher is None and trainer.teacher_tokenizer is None
    assert trainer.dataset[0].teacher is None
    batch = trainer.collator([trainer.dataset[i] for i in range(3)])
    assert batch.teacher is None and batch.num_spans.tolist() == [0, 0, 0] and (batch.student.span_ids == -1).all()
    result = trainer.train()
    metrics = rows(result.metrics_path)
    assert [r["step"] for r in metrics] == [1, 2]
    assert all("distill" not in r and r["loss"] == pytest.approx(r["ce"]) for r in metrics)  # CE only
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["truncation"]["teacher_tokenized"] is False
