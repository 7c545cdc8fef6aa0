"""benchmarks/sra_study.py (issue 17): its variants are valid settings, and its report sections compute what they
say from the runs' files (no model runs here)."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the study imports quality.py as a sibling module
spec = importlib.util.spec_from_file_location("sra_study_bench", BENCHMARKS / "sra_study.py")
study = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = study
spec.loader.exec_module(study)


@pytest.mark.parametrize("name", sorted(study.VARIANTS))
def test_every_variant_is_a_valid_setting(name):
    from sra_distill.config import load_config

    load_config(None, list(study.VARIANTS[name][1]))
    assert set(study.DEFAULT_VARIANTS) <= set(study.VARIANTS)
    assert {n for group in study.TRAINING_SEEDS.values() for n in group} <= set(study.VARIANTS)


def test_kl_mean_variant_reaches_the_config():
    from sra_distill.config import load_config

    cfg = load_config(None, list(study.VARIANTS["sra_klmean"][1]))
    assert (cfg.method, cfg.methods.sra.kl_normalization) == ("sra", "mean")


def test_grads_section_reports_mean_min_max_per_term():
    rows = [{"terms": {"CE": dict(norm=2.0, cos_ce=1.0), "L_kl": dict(norm=40.0, cos_ce=-0.2)},
             "values": {"CE": 1.5, "L_kl": 5.0}, "total_norm": 41.0, "cos_total_ce": 0.1},
            {"terms": {"CE": dict(norm=4.0, cos_ce=1.0), "L_kl": dict(norm=60.0, cos_ce=0.0)},
             "values": {"CE": 2.5, "L_kl": 7.0}, "total_norm": 62.0, "cos_total_ce": -0.1}]
    text = study.grads_section("untrained", rows, "cmd")
    assert "| CE | 2.000 (1.500-2.500) | 3.00 (2.00-4.00) | - |" in text
    assert "| L_kl | 6.000 (5.000-7.000) | 50.00 (40.00-60.00) | -0.10 (-0.20-+0.00) |" in text
    assert "51.50 (41.00-62.00)" in text


def _fake_run(root: Path, name: str, scores: list[list[float]]) -> dict:
    """A finished dev run: predictions.jsonl with ROUGE-L (fraction) per example and sampling seed."""
    eval_dir = root / name / "eval"
    eval_dir.mkdir(parents=True)
    rows = [dict(set=study.DEV_SET[0], index=i, seed=s, rougeL=v / 100)
            for s, per_example in enumerate(scores) for i, v in enumerate(per_example)]
    (eval_dir / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mean = float(np.mean(scores))
    return dict(rouge_l_mean=mean, eval_dir="eval", train_s=60.0, train_ce=3.0,
                sets={study.DEV_SET[0]: dict(mean=mean, std=0.0)})


def test_training_seed_comparison_averages_over_seeds_before_the_bootstrap(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 30, size=40)
    results = {}
    for seed_index, (sft, sra) in enumerate(zip(study.TRAINING_SEEDS["SFT"][:2], study.TRAINING_SEEDS["SRA"][:2])):
        results[sft] = _fake_run(tmp_path, sft, [list(base + seed_index), list(base + seed_index)])
        results[sra] = _fake_run(tmp_path, sra, [list(base + 2 + seed_index), list(base + 2 + seed_index)])
    for uld in study.TRAINING_SEEDS["ULD"]:  # three seeds, one more than SRA has
        results[uld] = _fake_run(tmp_path, uld, [list(base + 3), list(base + 3)])
    results["mined"] = _fake_run(tmp_path, "mined", [list(base)])  # one seed: no comparison with it
    lines = "\n".join(study.training_seed_lines(tmp_path, results))
    assert "scores averaged over the 2 training seeds (42, 43): SRA - SFT = +2.00, 95% interval [+2.00, +2.00]" in lines
    assert "SRA - ULD = -0.50, 95% interval [-0.50, -0.50]" in lines  # paired on the seeds both have (42, 43)
    assert "ULD, lr 5e-5 (seeds 42, 43, 44)" in lines and "MinED" not in lines
    one_seed = {k: v for k, v in results.items() if k in (study.TRAINING_SEEDS["SFT"][0], study.TRAINING_SEEDS["SRA"][0])}
    assert study.training_seed_lines(tmp_path, one_seed) == []  # one seed: no seed comparison


def test_dev_section_compares_with_the_best_seed_42_sft_row(tmp_path):
    budget = study.dev_budget(40)
    results = {"untrained": _fake_run(tmp_path, "untrained", [[5.0] * 40]),
               "sft": _fake_run(tmp_path, "sft", [[8.0] * 40]),
               "sft_s43": _fake_run(tmp_path, "sft_s43", [[20.0] * 40]),  # a seed twin is never the reference
               "sra_klmean": _fake_run(tmp_path, "sra_klmean", [[9.0] * 40])}
    text = study.dev_section(budget, tmp_path, ["untrained", "sft", "sft_s43", "sra_klmean", "sra_t1"], results,
                             {}, "cmd")
    assert "against the best SFT row (sft)" in text
    assert "| +4.00 | 3.000 | 1.0 min | +1.00 [+1.00, +1.00] |" in text
    assert "| SRA, tau 1 | pending | | | | |" in text


def test_dev_section_compares_with_a_named_variant_and_tolerates_rows_without_kept_scores(tmp_path):
    budget = study.dev_budget(40, steps=72)
    results = {"uld": _fake_run(tmp_path, "uld", [[10.0] * 40]),
               "sra_klmean": _fake_run(tmp_path, "sra_klmean", [[11.5] * 40]),
               # a row kept as a summary only (its run folder gone, no per-example scores)
               "sft": dict(rouge_l_mean=9.0, train_s=60.0, train_ce=3.1, sets={study.DEV_SET[0]: dict(mean=9.0, std=0.1)})}
    text = study.dev_section(budget, tmp_path, ["uld", "sra_klmean", "sft"], results, {}, "cmd",
                             against=("uld", "sft"))
    assert "### Recipe variants on Dolly dev, 72 steps" in text and "against uld (ULD, lr 5e-5" in text
    assert "| vs uld (95% interval) | vs sft (95% interval) |" in text
    assert "| +1.50 [+1.50, +1.50] | - |" in text  # sft's scores were not kept: no comparison with it
    assert "| SFT, lr 5e-5 | 9.00 ± 0.10 | - | 3.100 | 1.0 min | - | - |" in text
    assert budget.tag() == "demo-s72-b8-l192"


def test_shown_command_leaves_out_where_files_go():
    argv = ["--output", "/abs/out.md", "dev", "--work-dir=/tmp/w", "--steps", "72", "--variants", "sft,uld"]
    assert study.shown_command(argv) == "python benchmarks/sra_study.py dev --steps 72 --variants sft,uld"
