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
    from sra_distill.config import METHOD_NAMES
    from sra_distill.losses.divergences import KINDS  # the same-tokenizer methods

    trained_methods = {o.split("=", 1)[1] for r in quality.RUNS for o in r.overrides if o.startswith("method=")}
    assert trained_methods == set(METHOD_NAMES) - set(KINDS)
    switches = {r.name: {o for o in r.overrides if o.startswith("methods.sra.")} for r in quality.RUNS}
    assert switches["sra_kl_only"] == {"methods.sra.use_cos=false", "methods.sra.use_geo=false"}
    assert switches["sra_cos_geo"] == {"methods.sra.use_kl=false"}
    assert switches["sra_mean_pool"] == {"methods.sra.weighted_pooling=false"}
    assert switches["sra_uniform_w"] == {"methods.sra.weighted_loss=false"}
    assert switches["sra_recommended"] == {"methods.sra.kl_normalization=mean"}
    assert len(quality.RUNS) == 16 and len(quality.RUNS_BY_NAME) == 16
    assert {r.name for r in quality.RUNS if not r.trains} == {"untrained", "teacher"}


def test_ablation_overrides_are_valid_settings():
    from sra_distill.config import load_config

    cfg = load_config(None, list(quality.RUNS_BY_NAME["sra_kl_geo"].overrides))
    assert (cfg.methods.sra.use_cos, cfg.methods.sra.use_geo, cfg.methods.sra.use_kl) == (False, True, True)
    assert load_config(None, list(quality.RUNS_BY_NAME["sra_recommended"].overrides)).methods.sra.kl_normalization \
        == "mean"
    budget = quality.budget_from_args(quality.parse_args([]))
    cfg = load_config(None, budget.train_overrides())
    assert (cfg.max_steps, cfg.batch_size, cfg.max_length, cfg.resume) == (
        budget.steps, budget.batch_size, budget.max_length, True)


def test_arguments_override_the_budget_and_bad_values_are_named():
    budget = quality.budget_from_args(quality.parse_args(["--steps", "30", "--seeds", "1,2", "--eval-examples", "7"]))
    assert (budget.steps, budget.seeds, budget.eval_examples, budget.warmup_steps) == (30, (1, 2), 7, 3)
    assert budget.eval_sets == ("dolly", "self-inst")
    assert quality.budget_from_args(quality.parse_args(["--sets", "dolly"])).eval_sets == ("dolly",)
    with pytest.raises(SystemExit, match="vicunya"):
        quality.budget_from_args(quality.parse_args(["--sets", "dolly,vicunya"]))
    assert budget.config is None and budget.tag() == "demo-s30-b8-l192"
    with pytest.raises(SystemExit, match="--steps"):
        quality.budget_from_args(quality.parse_args(["--steps", "0"]))
    with pytest.raises(SystemExit, match="--seeds"):
        quality.budget_from_args(quality.parse_args(["--seeds", "a,b"]))
    with pytest.raises(SystemExit, match="nope"):
        quality.select_runs("sra,nope", quick=False)
    assert [r.name for r in quality.select_runs(" dskd , sft", quick=False)] == ["dskd", "sft"]
    assert "teacher" not in [r.name for r in quality.select_runs(None, quick=True)]


def test_reference_rows_score_the_teacher_and_the_untrained_student_and_skip_random_ones():
    full = quality.budget_from_args(quality.parse_args([]))
    quick = quality.budget_from_args(quality.parse_args(["--quick"]))
    teacher, untrained = quality.RUNS_BY_NAME["teacher"], quality.RUNS_BY_NAME["untrained"]
    assert quality.reference_model(teacher, full) == ["--model", "smollm2-135m-instruct"]
    assert quality.reference_model(untrained, full) == ["--model", "from:smollm2-135m-instruct", "--tokenizer", "llama2"]
    assert quality.reference_model(teacher, quick) is None and quality.reference_model(untrained, quick) is None


def test_paired_bootstrap_interval_covers_the_mean_difference():
    import numpy as np

    rng = np.random.default_rng(1)
    b = rng.uniform(0, 40, size=200)
    a = b + 2.0 + rng.normal(0, 1, size=200)
    diff, low, high = quality.paired_bootstrap(a, b)
    assert diff == pytest.approx(float((a - b).mean()))
    assert low < diff < high and 1.5 < low and high < 2.5
    same, low, high = quality.paired_bootstrap(b, b)
    assert same == low == high == 0.0
    with pytest.raises(ValueError):
        quality.paired_bootstrap(a, b[:10])


def test_final_train_ce_averages_the_last_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i, "ce": float(i)}) + "\n" for i in range(1, 16)))
    assert quality.final_train_ce(path) == pytest.approx(sum(range(6, 16)) / 10)
    assert quality.final_train_ce(path, window=3) == pytest.approx(14.0)


def _result(label, avg_by_set, std, train_s=0.0, eval_s=30.0, **extra):
    sets = {name: dict(mean=m, std=std, per_seed=[m - std, m + std], n_examples=100) for name, m in avg_by_set.items()}
    mean = sum(avg_by_set.values()) / len(avg_by_set)
    return dict(label=label, train_s=train_s, eval_s=eval_s, sets=sets, rouge_l_mean=mean, rouge_l_std=std, **extra)


def test_report_shows_results_gains_pending_rows_failures_and_the_separation():
    budget = quality.budget_from_args(quality.parse_args([]))
    runs = [quality.RUNS_BY_NAME[n] for n in ("untrained", "teacher", "sft", "sra", "uld", "dskd")]
    results = {
        "untrained": _result("Student before training (reference)", {"dolly": 6.0, "self-inst": 4.0}, 0.2),
        "teacher": _result("Teacher (no training, reference)", {"dolly": 25.0, "self-inst": 15.0}, 0.5, eval_s=60.0),
        "sft": _result("SFT (CE only)", {"dolly": 10.0, "self-inst": 8.0}, 0.3, train_s=120.0, train_ce=4.25),
        "sra": _result("SRA (full)", {"dolly": 12.5, "self-inst": 9.5}, 0.25, train_s=180.0, train_ce=4.0),
    }
    text = quality.render_report(budget, runs, results, {"uld": "uld: distill failed"}, 400.0, quick=False)
    assert "| SRA (full) | 12.50 ± 0.25 | 9.50 ± 0.25 | 11.00 | +6.00 | 4.000 | 3.0 min | 0.5 min |" in text
    assert "| Teacher (no training, reference) | 25.00 ± 0.50 | 15.00 ± 0.50 | 20.00 | +15.00 | - | - | 1.0 min |" in text
    assert "| Student before training (reference) | 6.00 ± 0.20 | 4.00 ± 0.20 | 5.00 | - |" in text
    assert "| ULD | failed (see log) |" in text and "| DSKD (CMA) | pending |" in text
    assert "Best student: **SRA (full)** (avg 11.00)" in text  # references are not contenders
    assert "Spread 2.00 points against a largest per-set seed std of 0.30: this budget separates" in text
    assert "Sum of per-run wall times: 7.5 min" in text  # 0.5 + 1.0 + 2.5 + 3.5
    assert "first 100 examples of dolly" in text and "Commit: `" in text
    close = quality.render_report(budget, runs, {"sft": results["sft"], "sra": {**results["sra"], "rouge_l_mean": 9.2}},
                                  {}, 1.0, quick=False)
    assert "does NOT separate" in close


def test_comparison_is_recomputed_from_kept_scores_or_kept_when_scores_are_missing(tmp_path):
    import numpy as np

    budget = quality.budget_from_args(quality.parse_args(["--sets", "dolly"]))
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 30, size=50)
    results = {
        "sft": _result("SFT (CE only)", {"dolly": 10.0}, 0.3, name="sft", per_example={"dolly": base.tolist()}),
        "uld": _result("ULD", {"dolly": 11.0}, 0.3, name="uld", per_example={"dolly": (base + 1).tolist()}),
        "sra": _result("SRA (full)", {"dolly": 12.0}, 0.3, name="sra", per_example={"dolly": (base + 2).tolist()}),
        # kept before per-example scores were: its stored comparison with the same baseline stays
        "sra_recommended": _result("SRA, recommended", {"dolly": 11.5}, 0.3, name="sra_recommended",
                                   bootstrap=dict(against="uld", rows=[["dolly", 0.5, 0.1, 0.9]])),
    }
    quality.update_comparisons(tmp_path, results, budget)
    assert results["sra"]["bootstrap"]["against"] == "uld"  # the best baseline by average
    (set_name, diff, low, high), (pooled, *_) = results["sra"]["bootstrap"]["rows"]
    assert (set_name, pooled) == ("dolly", "all examples") and diff == pytest.approx(1.0) and low == high
    assert results["sra_recommended"]["bootstrap"]["rows"] == [["dolly", 0.5, 0.1, 0.9]]
    text = "\n".join(quality.comparison_lines(results, budget))
    assert "**SRA (full) against the best baseline (ULD)**" in text and "| dolly | +1.00 | [+1.00, +1.00] |" in text
    assert "| dolly | +0.50 | [+0.10, +0.90] |" in text
    # A stored comparison against another baseline is stale: it says so instead of showing old numbers.
    results["uld"]["rouge_l_mean"] = 9.0
    quality.update_comparisons(tmp_path, results, budget)
    assert results["sra_recommended"]["bootstrap"] == dict(against="sft", rows=None)
    assert "SRA, recommended against the best baseline (SFT (CE only))**: not computed" in "\n".join(
        quality.comparison_lines(results, budget))


def test_record_keeps_budgets_apart_and_names_a_broken_file(tmp_path):
    path = quality.record_path(tmp_path / "quality.md")
    assert path.name == "quality.runs.json"
    small = quality.budget_from_args(quality.parse_args(["--steps", "2"]))
    big = quality.budget_from_args(quality.parse_args(["--steps", "4"]))
    quality.save_record(path, small, {"sft": {"x": 1}})
    quality.save_record(path, big, {"sft": {"x": 2}})
    quality.save_record(path, small, {"sra": {"x": 3}})
    assert quality.load_record(path, small) == {"sft": {"x": 1}, "sra": {"x": 3}}
    assert quality.load_record(path, big) == {"sft": {"x": 2}}
    path.write_text("{not json")
    with pytest.raises(SystemExit, match="quality.runs.json"):
        quality.load_record(path, small)


@pytest.mark.slow
def test_quick_run_trains_evaluates_writes_the_report_and_skips_done_runs(tmp_path, capsys):
    argv = ["--quick", "--methods", "sft,sra", "--work-dir", str(tmp_path), "--output", str(tmp_path / "q.md")]
    assert quality.main(argv) == 0
    run_dir = tmp_path / "tiny-s2-b4-l128" / "sra"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    tag = "eval-n2-t8-seeds10-dolly_self-inst"
    result = json.loads((run_dir / f"result-{tag}.json").read_text())
    scores = json.loads((run_dir / tag / "scores.json").read_text())
    for name in ("dolly", "self-inst"):
        assert result["sets"][name]["mean"] == scores["sets"][name]["mean"]
        assert result["sets"][name]["n_examples"] == 2
    assert result["train_ce"] == pytest.approx(sum(m["ce"] for m in metrics) / 2)
    report = (tmp_path / "q.md").read_text()
    assert "| SRA (full) |" in report and "pending" not in report
    assert "SRA (full) against the best baseline (SFT (CE only))" in report and "| all examples |" in report
    assert result["commit"]
    # A second invocation finds the result and runs nothing.
    capsys.readouterr()
    stamp = (run_dir / "final").stat().st_mtime_ns
    assert quality.main(argv) == 0
    assert "already done, skipped" in capsys.readouterr().out
    assert (run_dir / "final").stat().st_mtime_ns == stamp
    # --report-only rewrites the report from finished runs and starts none.
    assert quality.main([*argv[:2], "sft,sra,uld", *argv[3:], "--report-only"]) == 0
    assert not (tmp_path / "tiny-s2-b4-l128" / "uld").exists()
    assert "| ULD | pending |" in (tmp_path / "q.md").read_text()
    # The committed record beside the report keeps each result with its per-example scores: with the run
    # folders gone, the rows and the bootstrap come back from it and nothing runs again.
    record = json.loads((tmp_path / "q.runs.json").read_text())["tiny-s2-b4-l128/" + tag]
    assert set(record) == {"sft", "sra"} and len(record["sra"]["per_example"]["dolly"]) == 2
    assert record["sra"]["bootstrap"]["against"] == "sft"
    import shutil

    shutil.rmtree(tmp_path / "tiny-s2-b4-l128")
    capsys.readouterr()
    assert quality.main(argv) == 0
    assert capsys.readouterr().out.count("read from") == 2
    assert not (tmp_path / "tiny-s2-b4-l128" / "sra").exists()
    again = (tmp_path / "q.md").read_text()
    assert again.split("| SRA (full) |")[1].split("\n")[0] == report.split("| SRA (full) |")[1].split("\n")[0]
    assert "SRA (full) against the best baseline (SFT (CE only))" in again
