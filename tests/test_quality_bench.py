"""benchmarks/quality.py: budget/run selection, the report, and one real quick run (tiny config) that resumes."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
spec = importlib.util.spec_from_file_location("quality_bench", BENCH)
quality = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = quality  # dataclasses look their module up there
spec.loader.exec_module(quality)


def test_every_cross_tokenizer_method_and_each_paper_ablation_is_a_run():
    from sra_distill.methods import CROSS_TOKENIZER_METHODS

    trained_methods = {o.split("=", 1)[1] for r in quality.RUNS for o in r.overrides if o.startswith("method=")}
    assert trained_methods == set(CROSS_TOKENIZER_METHODS)
    switches = {r.name: {o for o in r.overrides if o.startswith("methods.sra.")} for r in quality.RUNS}
    assert switches["sra_kl_only"] == {"methods.sra.use_cos=false", "methods.sra.use_geo=false"}
    assert switches["sra_cos_geo"] == {"methods.sra.use_kl=false"}
    assert switches["sra_mean_pool"] == {"methods.sra.weighted_pooling=false"}
    assert switches["sra_uniform_w"] == {"methods.sra.weighted_loss=false"}
    assert len(quality.RUNS) == 13 and len(quality.RUNS_BY_NAME) == 13


def test_ablation_overrides_are_valid_settings():
    from sra_distill.config import load_config

    cfg = load_config(None, list(quality.RUNS_BY_NAME["sra_kl_geo"].overrides))
    assert (cfg.methods.sra.use_cos, cfg.methods.sra.use_geo, cfg.methods.sra.use_kl) == (False, True, True)
    budget = quality.budget_from_args(quality.parse_args([]))
    cfg = load_config(None, budget.train_overrides())
    assert (cfg.max_steps, cfg.batch_size, cfg.max_length, cfg.resume) == (
        budget.steps, budget.batch_size, budget.max_length, True)


def test_arguments_override_the_budget_and_bad_values_are_named():
    budget = quality.budget_from_args(quality.parse_args(["--steps", "30", "--seeds", "1,2", "--eval-examples", "7"]))
    assert (budget.steps, budget.seeds, budget.eval_examples, budget.warmup_steps) == (30, (1, 2), 7, 3)
    assert budget.config is None and budget.tag() == "demo-s30-b8-l192"
    with pytest.raises(SystemExit, match="--steps"):
        quality.budget_from_args(quality.parse_args(["--steps", "0"]))
    with pytest.raises(SystemExit, match="--seeds"):
        quality.budget_from_args(quality.parse_args(["--seeds", "a,b"]))
    with pytest.raises(SystemExit, match="nope"):
        quality.select_runs("sra,nope", quick=False)
    assert [r.name for r in quality.select_runs(" dskd , sft", quick=False)] == ["dskd", "sft"]
    assert "teacher" not in [r.name for r in quality.select_runs(None, quick=True)]


def test_teacher_row_uses_the_packaged_teacher_and_skips_random_ones():
    full = quality.budget_from_args(quality.parse_args([]))
    quick = quality.budget_from_args(quality.parse_args(["--quick"]))
    assert quality.teacher_model(full) == "smollm2-135m-instruct"
    assert quality.teacher_model(quick) is None


def test_final_train_ce_averages_the_last_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i, "ce": float(i)}) + "\n" for i in range(1, 16)))
    assert quality.final_train_ce(path) == pytest.approx(sum(range(6, 16)) / 10)
    assert quality.final_train_ce(path, window=3) == pytest.approx(14.0)


def test_report_shows_results_pending_rows_failures_and_the_best_student():
    budget = quality.budget_from_args(quality.parse_args([]))
    runs = [quality.RUNS_BY_NAME[n] for n in ("teacher", "sft", "sra", "uld", "dskd")]
    results = {
        "teacher": dict(label="Teacher (no training, reference)", train_s=0.0, eval_s=60.0, rouge_l_mean=25.0,
                        rouge_l_std=0.5, rouge_l_per_seed=[24.5, 25.5]),
        "sft": dict(label="SFT (CE only)", train_s=120.0, eval_s=30.0, train_ce=4.25, rouge_l_mean=10.0,
                    rouge_l_std=1.0, rouge_l_per_seed=[9.0, 11.0]),
        "sra": dict(label="SRA (full)", train_s=180.0, eval_s=30.0, train_ce=4.0, rouge_l_mean=12.5,
                    rouge_l_std=0.25, rouge_l_per_seed=[12.25, 12.75]),
    }
    text = quality.render_report(budget, runs, results, {"uld": "uld: distill failed"}, 400.0, quick=False)
    assert "| SRA (full) | 12.50 ± 0.25 | 12.25, 12.75 | 4.000 | 3.0 min | 0.5 min |" in text
    assert "| Teacher (no training, reference) | 25.00 ± 0.50 | 24.50, 25.50 | - | - | 1.0 min |" in text
    assert "| ULD | failed (see log) |" in text and "| DSKD (CMA) | pending |" in text
    assert "Best student: **SRA (full)** (12.50 ± 0.25)" in text  # the teacher is a reference, not a contender
    assert "2.50 ROUGE-L points" in text
    assert "Sum of per-run wall times: 7.0 min" in text
    assert "50 Dolly test examples" in text and "Commit: `" in text
    tie = quality.render_report(budget, runs, {"sft": results["sft"], "sra": {**results["sra"], "rouge_l_mean": 10.0}},
                                {}, 1.0, quick=False)
    assert "no method wins" in tie and "Best student" not in tie


@pytest.mark.slow
def test_quick_run_trains_evaluates_writes_the_report_and_skips_done_runs(tmp_path, capsys):
    argv = ["--quick", "--methods", "sra_kl_only", "--work-dir", str(tmp_path), "--output", str(tmp_path / "q.md")]
    assert quality.main(argv) == 0
    run_dir = tmp_path / "tiny-s2-b4-l128" / "sra_kl_only"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["cos"] == 0.0 and m["geo"] == 0.0 for m in metrics)
    result = json.loads((run_dir / "result-eval-n2-t8-seeds10.json").read_text())
    scores = json.loads((run_dir / "eval-n2-t8-seeds10" / "scores.json").read_text())
    assert result["rouge_l_mean"] == scores["sets"]["dolly"]["mean"] and result["n_examples"] == 2
    assert result["train_ce"] == pytest.approx(sum(m["ce"] for m in metrics) / 2)
    report = (tmp_path / "q.md").read_text()
    assert "| SRA ablation: span KL only |" in report and "pending" not in report
    # A second invocation finds the result and runs nothing.
    capsys.readouterr()
    stamp = (run_dir / "final").stat().st_mtime_ns
    assert quality.main(argv) == 0
    assert "already done, skipped" in capsys.readouterr().out
    assert (run_dir / "final").stat().st_mtime_ns == stamp
