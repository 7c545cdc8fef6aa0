"""benchmarks/sra_study.py (issue 17): its variants are valid settings, and its report sections compute what they
say, and its dev part is `sra compare` with the variants as candidates (no model runs here)."""

import importlib.util
import sys
from pathlib import Path

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

    load_config(None, list(study.VARIANTS[name]))
    assert set(study.DEFAULT_VARIANTS) <= set(study.VARIANTS)


def test_kl_mean_variant_reaches_the_config():
    from sra_distill.config import load_config

    cfg = load_config(None, list(study.VARIANTS["sra_klmean"]))
    assert (cfg.method, cfg.methods.sra.kl_normalization) == ("sra", "mean")


def test_the_dev_part_is_sra_compare_with_the_variants_as_candidates(tmp_path):
    from sra_distill.cli import build_parser
    from sra_distill.compare import comparison_from_args

    argv = ["--output", str(tmp_path / "study.md"), "dev", "--variants", "sft,sra_klmean", "--steps", "72",
            "--work-dir", str(tmp_path / "w"), "--seeds", "42,43", "--teacher", "raw"]
    command = study.dev_argv(*study.parse_args(argv))
    cmp = comparison_from_args(build_parser().parse_args(command))
    assert [(c.name, c.overrides) for c in cmp.candidates] == [
        ("sft", ("method=sft",)), ("sra_klmean", ("method=sra", "methods.sra.kl_normalization=mean"))]
    assert cmp.seeds == (42, 43) and cmp.teacher == "raw"
    assert cmp.output == tmp_path / "sra_study_dev_raw-s72" and cmp.runs == tmp_path / "w" / "sra_study_dev_raw-s72"
    assert "max_steps=72" in cmp.overrides and "batch_size=8" in cmp.overrides
    with pytest.raises(SystemExit, match="nope"):
        study.dev_argv(*study.parse_args(["dev", "--variants", "sft,nope"]))


def test_grads_section_reports_mean_min_max_per_term():
    rows = [{"terms": {"CE": dict(norm=2.0, cos_ce=1.0), "L_kl": dict(norm=40.0, cos_ce=-0.2)},
             "values": {"CE": 1.5, "L_kl": 5.0}, "total_norm": 41.0, "cos_total_ce": 0.1},
            {"terms": {"CE": dict(norm=4.0, cos_ce=1.0), "L_kl": dict(norm=60.0, cos_ce=0.0)},
             "values": {"CE": 2.5, "L_kl": 7.0}, "total_norm": 62.0, "cos_total_ce": -0.1}]
    text = study.grads_section("untrained", rows, "cmd")
    assert "| CE | 2.000 (1.500-2.500) | 3.00 (2.00-4.00) | - |" in text
    assert "| L_kl | 6.000 (5.000-7.000) | 50.00 (40.00-60.00) | -0.10 (-0.20-+0.00) |" in text
    assert "51.50 (41.00-62.00)" in text


def test_shown_command_leaves_out_where_files_go():
    argv = ["--output", "/abs/out.md", "dev", "--work-dir=/tmp/w", "--steps", "72", "--variants", "sft,uld"]
    assert study.shown_command(argv) == "python benchmarks/sra_study.py dev --steps 72 --variants sft,uld"
