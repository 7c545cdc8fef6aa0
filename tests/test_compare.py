"""`sra compare` (sra_distill/compare.py) and the tuned-teacher step (train/teacher_tuning.py) on the tiny config."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from sra_distill import compare
from sra_distill.cli import main
from sra_distill.compare import Candidate, Comparison, Protocol, paired_bootstrap, render
from sra_distill.errors import ConfigError

TINY_PROTOCOL = Protocol(dev_examples=2, dev_seeds=(10,), test_examples=2, test_seeds=(10,), max_new_tokens=4,
                         batch_size=4)


def tiny(output, candidates=("sft", "sra"), seeds=(1,), teacher="raw", overrides=(), **kw) -> Comparison:
    return Comparison(output=output, candidates=[Candidate.parse(c) for c in candidates], config="tiny_path",
                      overrides=["max_steps=2", *overrides], seeds=seeds, protocol=TINY_PROTOCOL, teacher=teacher,
                      progress=False, **kw)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SRA_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tiny_path():
    from sra_distill.paths import resolve_config
    return str(resolve_config("tiny"))


def _run(cmp: Comparison, tiny_path: str) -> tuple[dict, list[str]]:
    cmp.config = tiny_path
    lines: list[str] = []
    return compare.run_comparison(cmp, log=lines.append), lines


def test_a_trained_run_keeps_its_final_weights_and_drops_its_checkpoints_unless_asked(tmp_path, tiny_path):
    out = tmp_path / "cmp"
    # save_every above half the budget: the comparison checkpoints its runs every quarter (here every step).
    _run(tiny(out, candidates=("sft",), overrides=("save_every=5",)), tiny_path)
    run = out / "runs/sft/seed-1"
    assert (run / "final/config.json").is_file() and (run / "trained.json").is_file()
    assert not (run / "checkpoints").exists()
    _run(tiny(out, candidates=("sft",), seeds=(1, 2), overrides=("save_every=5",), keep_checkpoints=True), tiny_path)
    assert [p.name for p in (out / "runs/sft/seed-2/checkpoints").iterdir()] == ["step-2"]


def test_candidates_parse_from_a_method_or_overrides():
    assert Candidate.parse("mined") == Candidate("mined", ("method=mined",))
    assert Candidate.parse("sra_mean=method=sra,methods.sra.kl_normalization=mean") == Candidate(
        "sra_mean", ("method=sra", "methods.sra.kl_normalization=mean"))
    assert Candidate.parse("lr1e4=method=sft lr=1e-4").overrides == ("method=sft", "lr=1e-4")
    with pytest.raises(ConfigError, match="candidate"):
        Candidate.parse("x=method")


def test_a_comparison_trains_scores_tables_and_resumes(tmp_path, tiny_path):
    out = tmp_path / "cmp"
    results, lines = _run(tiny(out), tiny_path)
    assert set(results["runs"]) == {"sft/1", "sra/1"}
    for row in results["runs"].values():
        for split, sets in (("dev", ["dolly-dev"]), ("test", ["dolly", "self-inst"])):
            assert sorted(row[split]["per_example"]) == sorted(sets)
            assert all(len(v) == 2 for v in row[split]["per_example"].values())
        assert row["train_s"] > 0 and row["eval_s"] > 0
    sra_config = yaml.safe_load((out / "runs/sra/seed-1/config.yaml").read_text())
    assert sra_config["seed"] == 1 and sra_config["method"] == "sra" and sra_config["teacher_cache"] == "auto"
    table = (out / "compare.md").read_text()
    assert "| sft" in table and "| sra" in table and "teacher (reference)" in table and "Selected on dev" in table
    assert "- Teacher: as given (`--teacher raw`" in table  # a raw run may still name a teacher tuned elsewhere
    assert (out / "compare.png").stat().st_size > 0

    # Again: nothing is re-run; one more seed runs only that seed.
    _, lines = _run(tiny(out), tiny_path)
    assert any("0 runs to do" in line for line in lines)
    results, lines = _run(tiny(out, candidates=("sft",), seeds=(1, 2)), tiny_path)
    assert any("1 runs to do" in line for line in lines) and "sft/2" in results["runs"]
    assert "1, 2" in (out / "compare.md").read_text()

    # Rows of other base settings, or a name reused for other overrides, are refused before anything runs.
    with pytest.raises(ConfigError, match=r"other base settings \(settings.max_length 128 -> 96"):
        _run(tiny(out, overrides=["max_length=96"]), tiny_path)
    with pytest.raises(ConfigError, match="candidate 'sra' was run there as method=sra"):
        _run(tiny(out, candidates=("sra=method=sra,alpha=0.9",)), tiny_path)


def test_the_tuned_teacher_is_built_once_and_every_candidate_distils_from_it(tmp_path, tiny_path, monkeypatch):
    from sra_distill.train import teacher_tuning

    tuning = teacher_tuning.TeacherTuning(steps=2, warmup_steps=0)
    results, _ = _run(tiny(tmp_path / "a", candidates=("sra",), teacher="tuned", tuning=tuning), tiny_path)
    teacher = results["teacher"]
    assert "tuned-teachers" in teacher and (compare.Path(teacher).parent / "tuned.json").is_file()
    run_config = yaml.safe_load((tmp_path / "a/runs/sra/seed-1/config.yaml").read_text())
    assert run_config["teacher"] == teacher
    tuned_config = yaml.safe_load((compare.Path(teacher).parent / "config.yaml").read_text())
    assert tuned_config["method"] == "sft" and tuned_config["student"] == "random:llama"
    assert tuned_config["max_steps"] == 2
    assert "tuned on the training data first" in (tmp_path / "a/compare.md").read_text()

    # A second comparison with the same teacher, data and tuning reads the cached teacher: no training of it.
    class NoTraining:
        def __init__(self, cfg):
            if cfg.method == "sft" and cfg.student == "random:llama":
                raise AssertionError("the tuned teacher was trained twice")
            raise RuntimeError("stop after the teacher step")

    monkeypatch.setattr("sra_distill.train.engine.Trainer", NoTraining)
    with pytest.raises(RuntimeError, match="stop after the teacher step"):
        _run(tiny(tmp_path / "b", candidates=("sra",), teacher="tuned", tuning=tuning, references=()), tiny_path)


def test_the_tuned_teacher_key_follows_the_data_content_not_its_file_date(tmp_path, tiny_path):
    """A data folder mounted anew (a fresh machine: same bytes, new mtime) keeps its tuned teacher; an edit does not."""
    import os

    from sra_distill.config import load_config
    from sra_distill.train.teacher_tuning import TeacherTuning, tuned_teacher_key

    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    cfg = load_config(tiny_path, [f"train_data={data}"])
    key = tuned_teacher_key(cfg, TeacherTuning())
    os.utime(data, ns=(1, 1))
    assert tuned_teacher_key(cfg, TeacherTuning()) == key
    data.write_text('{"prompt": "a", "response": "c"}\n')
    assert tuned_teacher_key(cfg, TeacherTuning()) != key
    assert tuned_teacher_key(cfg, TeacherTuning(steps=7)) != tuned_teacher_key(cfg, TeacherTuning())


def test_the_candidates_that_read_the_teacher_share_one_cache_per_seed(tmp_path, tiny_path):
    import json

    from sra_distill.train.engine import Trainer, records_read
    from sra_distill.train.teacher_cache import MANIFEST_NAME

    out = tmp_path / "cmp"
    _, lines = _run(tiny(out, candidates=("sft", "sra", "mined"), references=()), tiny_path)
    (cache,) = [p for p in (out / "runs/teacher-cache").iterdir() if p.is_dir()]
    assert cache.name.startswith("seed-1-") and sum("one teacher cache" in line for line in lines) == 1
    for name in ("sra", "mined"):
        config = yaml.safe_load((out / f"runs/{name}/seed-1/config.yaml").read_text())
        assert config["teacher_cache"] == str(cache)
    # Only the 8 records 2 steps of 4 read (of the tiny config's 16): the teacher ran once for both runs.
    index = json.loads((cache / MANIFEST_NAME).read_text())["index"]
    assert len(index) == len(records_read(compare.load_config(tiny_path, ["max_steps=2", "seed=1"]), 16)) == 8

    # A run interrupted before this (started with teacher_cache=auto) resumes with what it started with: a resume
    # refuses any other setting.
    started = tmp_path / "started"
    cfg = compare.load_config(tiny_path, ["max_steps=2", "method=sra", f"output_dir={started}", "save_every=1",
                                          "teacher_cache=auto", "progress=false"])
    trainer = Trainer(cfg)
    trainer.train_step(next(trainer._micro_batches()))
    trainer.state.step = 1
    trainer.save_checkpoint()
    trainer.close()
    assert compare.started_teacher_cache(started) == "auto" and compare.started_teacher_cache(tmp_path) is None


def test_an_on_policy_candidate_runs_with_the_live_teacher(tmp_path, tiny_path):
    """A teacher cache holds the dataset's responses only, and the engine refuses one with on-policy steps."""
    from sra_distill.validation import validate_settings

    cmp = tiny(tmp_path, candidates=("sra", "sra_gkd=method=sra,on_policy.ratio=0.5"))
    cmp.config = tiny_path
    base = compare.base_config(cmp)
    off, on = (compare.run_overrides(cmp, base, cand, 1, tmp_path / cand.name, None) for cand in cmp.candidates)
    assert "teacher_cache=auto" in off and not any(o.startswith("teacher_cache") for o in on)
    validate_settings(compare.load_config(tiny_path, on))  # accepted as it runs


def test_the_table_compares_with_the_dev_selected_row_and_sft_by_paired_bootstrap(tmp_path):
    rng = np.random.default_rng(0)

    def run(name, seed, dev, test_shift):
        per_example = {"dolly": list(rng.uniform(0, 40, 6) + test_shift), "self-inst": list(rng.uniform(0, 40, 4))}
        sets = {k: dict(mean=float(np.mean(v)), std=0.5, per_seed=[float(np.mean(v))]) for k, v in
                per_example.items()}
        return dict(candidate=name, seed=seed, train_s=60.0, eval_s=30.0,
                    dev=dict(average=dev, sets={"dolly-dev": dict(mean=dev, std=0.1, per_seed=[dev])},
                             per_example={"dolly-dev": [dev]}),
                    test=dict(average=float(np.mean([s["mean"] for s in sets.values()])), sets=sets,
                              per_example=per_example))

    runs = {f"{n}/{s}": run(n, s, dev, shift) for n, dev, shift in (("sft", 10.0, 0.0), ("mined", 12.0, 3.0),
                                                                      ("sra", 11.0, 1.0)) for s in (1, 2)}
    state = dict(base=dict(settings=dict(teacher="t", student="s", student_tokenizer="llama2", train_data="d",
                                         max_steps=24, epochs=1, batch_size=8, max_length=192),
                           protocol=dict(dev_sets=dict(compare.DEFAULT_DEV), dev_examples=1, dev_seeds=[10],
                                         test_sets=dict(compare.DEFAULT_TEST), test_examples=6, test_seeds=[10],
                                         max_new_tokens=64),
                           teacher="raw", tuning=None),
                 candidates={"sft": ["method=sft"], "mined": ["method=mined"], "sra": ["method=sra"]})
    text = render(tiny(tmp_path), state, dict(runs=runs, references={}))
    assert "vs best on dev (mined)" in text and "| mined **(selected)**" in text

    def examples(name):  # the plain computation: the two sets in name order, then the mean over both seeds
        return np.mean([np.concatenate([runs[f"{name}/{s}"]["test"]["per_example"][k] for k in ("dolly", "self-inst")])
                        for s in (1, 2)], axis=0)

    sra_line = next(line for line in text.splitlines() if line.startswith("| sra |"))
    for other in ("mined", "sft"):
        diff, low, high = paired_bootstrap(examples("sra"), examples(other))
        assert f"{diff:+.2f} [{low:+.2f}, {high:+.2f}]" in sra_line
    dev = [11.0, 11.0]
    assert f"{np.mean(dev):.2f} ± {np.std(dev):.2f}" in sra_line


def test_bad_comparisons_are_refused_in_one_line(tmp_path, tiny_path, capsys):
    with pytest.raises(ConfigError, match="both a dev and a test set"):
        Protocol(dev_sets={"dolly": "dolly/dev.jsonl"}, test_sets={"dolly": "dolly/valid.jsonl"}).check()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not a comparison folder"):
        _run(tiny(tmp_path / "busy"), tiny_path)
    assert (tmp_path / "busy" / "x.txt").read_text() == "keep"
    assert main(["compare", "--config", "tiny", "--candidates", "sft", "--output", str(tmp_path / "c"),
                 "method=nosuch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "method" in err[0]
    assert main(["compare", "--config", "tiny", "--output", str(tmp_path / "d")]) == 2
    assert "no candidates" in capsys.readouterr().err


def test_example_counts_take_all_and_refuse_zero(tmp_path):
    from sra_distill.cli import build_parser
    from sra_distill.compare import comparison_from_args

    args = build_parser().parse_args(["compare", "--candidates", "sft", "--output", str(tmp_path),
                                      "--test-examples", "all", "--test-suite", "paper"])
    cmp = comparison_from_args(args)
    assert cmp.protocol.test_examples is None and len(cmp.protocol.test_sets) == 5
    assert cmp.protocol.dev_examples == 50 and cmp.seeds == (42, 43, 44) and cmp.teacher == "tuned"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--candidates", "sft", "--output", "x", "--dev-examples", "0"])


def test_a_setting_added_after_the_folder_was_made_counts_only_away_from_its_default():
    new = dict(settings=dict(max_length=128, balance="alpha"), teacher="tuned")
    old = dict(settings=dict(max_length=128), teacher="tuned")  # made before `balance` existed
    assert compare.identity_differences(old, new) == []
    assert compare.identity_differences(old, dict(new, settings=dict(max_length=128, balance="gradmag"))) == [
        "settings.balance None -> 'gradmag'"]
    assert compare.identity_differences(dict(old, teacher="raw"), new) == ["teacher 'raw' -> 'tuned'"]
