"""Issue 29, "installed anywhere, it explains itself": packaged configs by name, data messages that name
SRA_DATA_ROOT, the tested versions, `sra doctor`, one-line refusals that write nothing, help without torch, and quiet
run output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sra_distill import environment
from sra_distill.cli import build_parser, main
from sra_distill.paths import CONFIGS_DIR, data_root, resolve_config

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ packaged configs
def test_packaged_configs_are_named_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    assert resolve_config("tiny") == CONFIGS_DIR / "tiny.yaml"
    assert resolve_config("configs/recommended.yaml") == CONFIGS_DIR / "recommended.yaml"  # the old path still works
    assert main(["config", "--config", "demo"]) == 0
    assert "teacher: smollm2-135m-instruct" in capsys.readouterr().out
    assert main(["config", "--config", "no-such-config"]) == 2
    err = capsys.readouterr().err
    assert "no-such-config" in err and "tiny" in err and "recommended" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------ data root in every "not found"
def test_missing_data_names_the_data_root_setting(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SRA_DATA_ROOT", str(tmp_path))
    assert main(["distill", "--config", "tiny", "train_data=dolly/nope.jsonl", f"output_dir={tmp_path / 'run'}"]) == 2
    assert f"SRA_DATA_ROOT={tmp_path}" in capsys.readouterr().err
    from sra_distill.data.records import DataError, load_records

    with pytest.raises(DataError, match="SRA_DATA_ROOT="):
        load_records("dolly/nope.jsonl")
    from sra_distill.data.tokenization import _load

    with pytest.raises(FileNotFoundError, match=f"SRA_DATA_ROOT={tmp_path}"):
        _load.__wrapped__("gpt2", False, True)  # past the per-process cache of tokenizers already loaded
    monkeypatch.delenv("SRA_DATA_ROOT")
    assert main(["distill", "--config", "tiny", "train_data=dolly/nope.jsonl", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "SRA_DATA_ROOT is unset, so the default" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_spans_with_a_known_tokenizer_and_no_data_root_names_the_setting(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SRA_DATA_ROOT", str(tmp_path))
    from sra_distill.data.tokenization import _load

    _load.cache_clear()  # tokenizers loaded by earlier tests would hide the missing folder
    try:
        assert main(["spans", "--student-tokenizer", "gpt2", "--teacher-tokenizer", "llama2", "--text", "hi"]) == 2
    finally:
        _load.cache_clear()
    err = capsys.readouterr().err
    assert "not a known name" not in err and f"tokenizers/gpt2 not found (SRA_DATA_ROOT={tmp_path})" in err


# ------------------------------------------------------------------ tested versions
def test_tested_versions_are_the_pinned_requirements():
    pins = dict(line.split("==") for line in (ROOT / "requirements-cpu.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert {name: pins[name] for name in environment.TESTED_VERSIONS} == environment.TESTED_VERSIONS


def test_untested_versions_warn_in_one_line_and_tested_ones_do_not(monkeypatch, capsys):
    assert main(["config", "--config", "tiny"]) == 0
    assert capsys.readouterr().err == ""  # this suite runs on the tested stack
    real = environment.installed_version
    monkeypatch.setattr(environment, "installed_version",
                        lambda name: "9.9.9" if name == "transformers" else real(name))
    assert main(["config", "--config", "tiny"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "transformers 9.9.9 (tested 5.24.0)" in err[0] and "transformers==5.24.0" in err[0]


# ------------------------------------------------------------------ sra doctor
def test_doctor_reports_on_one_screen_and_exits_0_when_usable(tmp_path, monkeypatch, capsys):
    # Set explicitly: CI runs with SRA_DATA_ROOT unset (the default root), a developer often with it set.
    monkeypatch.setenv("SRA_DATA_ROOT", str(data_root()))
    monkeypatch.setenv("SRA_CACHE", str(tmp_path / "cache"))
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for topic in ("data root", "training data", "cache", "tokenizers", "model smollm2-135m-instruct", "libraries",
                  "device"):
        assert topic in out
    assert f"SRA_DATA_ROOT={data_root()}" in out and "gpt2" in out and "llama2" in out
    assert len(out.splitlines()) <= 24


def test_doctor_says_when_the_data_root_is_the_default(tmp_path, monkeypatch, capsys):
    default = data_root()
    monkeypatch.delenv("SRA_DATA_ROOT", raising=False)
    if data_root() != default:
        pytest.skip("the default data root is not the one this run uses")
    monkeypatch.setenv("SRA_CACHE", str(tmp_path / "cache"))
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "SRA_DATA_ROOT is unset, so the default" in out


def test_doctor_names_what_is_missing_and_exits_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SRA_DATA_ROOT", str(tmp_path / "nowhere"))
    monkeypatch.setenv("SRA_CACHE", str(tmp_path / "cache"))
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "not usable: data root, training data" in out and "MISSING" in out


# ------------------------------------------------------------------ refusals: one line, exit 2, nothing written
def test_student_from_a_missing_folder_is_one_line(tmp_path, capsys):
    output = tmp_path / "student"
    assert main(["student", "--from", str(tmp_path / "nofolder"), "--tokenizer", "gpt2", "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "nofolder" in err and "packaged model" in err
    assert main(["student", "--from", "no-such-model", "--tokenizer", "gpt2", "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--allow-download" in err and "Traceback" not in err
    assert not output.exists()


def test_finished_run_without_checkpoints_is_refused_as_such(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)  # what a finished save_every=0 run leaves
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    for resume in ("false", "true"):
        assert main(["distill", "--config", "tiny", f"output_dir={out}", f"resume={resume}"]) == 2
        captured = capsys.readouterr()
        assert "finished run" in captured.err and "overwrite=true" in captured.err
        assert "continue it with resume=true" not in captured.err and "starting a fresh run" not in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["final", "metrics.jsonl"]


def test_failed_run_leaves_no_empty_output_folder(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": \n')
    out = tmp_path / "run"
    assert main(["distill", "--config", "tiny", f"train_data={bad}", f"output_dir={out}"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_gpt2, gpt2_tok):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_gpt2(initializer_range=0.2).save_pretrained(folder)
    gpt2_tok.save_pretrained(folder)
    return folder


def test_evaluate_names_its_download_option(tmp_path, capsys):
    argv = ["evaluate", "--model", "no-such-model", "--data", "dolly/dev.jsonl", "--max-examples", "1",
            "--output", str(tmp_path / "eval")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--allow-download" in err and len(err.splitlines()) == 1
    assert build_parser().parse_args([*argv, "--allow-download"]).allow_download
    assert not (tmp_path / "eval").exists()


def test_evaluate_refuses_another_models_scores_unless_overwrite(saved_model, tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    earlier = json.dumps({"model": str(tmp_path / "another-model"), "sets": {}, "average": 1.0})
    (out / "scores.json").write_text(earlier)
    argv = ["evaluate", "--model", str(saved_model), "--data", "dolly/dev.jsonl", "--max-examples", "1",
            "--seeds", "1", "--max-new-tokens", "2", "--no-progress", "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "another-model" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert (out / "scores.json").read_text() == earlier and not (out / "predictions.jsonl").exists()
    assert main([*argv, "--overwrite"]) == 0
    assert "Loading weights" not in capsys.readouterr().err  # --no-progress silences transformers' bars too
    assert json.loads((out / "scores.json").read_text())["model"] == str(saved_model)
    assert main(argv) == 0  # the same model again: its own scores are replaced without asking


# ------------------------------------------------------------------ help
def test_evaluate_help_has_a_description_and_every_default(capsys):
    parser = build_parser()
    evaluate = parser._subparsers._group_actions[0].choices["evaluate"]
    assert evaluate.description
    assert all(action.help for action in evaluate._actions)
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 10,20,30,40,50)", "(default: 8)", "the last ones (default: 256)",
                  "answer, tokens (default: 256)", "--allow-download", "--overwrite"):
        assert shown in out


def test_distill_help_lists_the_known_tokenizer_names(capsys):
    from sra_distill.data.tokenization import KNOWN_TOKENIZERS

    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    out = capsys.readouterr().out
    assert "see tokenization.py" not in out
    names_line = " ".join(out.split("known tokenizer names")[1].split("packaged models")[0].split())
    assert all(name in names_line for name in KNOWN_TOKENIZERS)


def test_help_of_the_commands_imports_no_torch():
    # One fresh interpreter asks each command for --help and reports which heavy modules got imported.
    commands = ["distill", "config", "evaluate", "spans", "report", "teacher-cache", "vocab", "student", "doctor"]
    code = (
        "import contextlib, io, sys\n"
        "from sra_distill.cli import main\n"
        f"for command in {commands!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main([command, '--help'])\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


# ------------------------------------------------------------------ quiet output
@pytest.mark.slow
def test_quiet_run_prints_no_library_noise_and_names_its_files(tmp_path, capfd):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert main(["distill", "--config", "tiny", "max_steps=1", "save_every=1", "progress=false",
                 "report_to=[tensorboard]", f"output_dir={out}"]) == 0
    captured = capfd.readouterr()
    printed = captured.out + captured.err
    assert "Writing model shards" not in printed and "Removed shared tensor" not in printed
    assert "truncation over the 4 records this run uses;" in printed and " examples;" not in printed
    assert f"tensorboard   : {out / 'tensorboard'}" in captured.out


def test_spans_names_the_option_of_an_unknown_tokenizer_once(capsys):
    assert main(["spans", "--student-tokenizer", "gpt2", "--teacher-tokenizer", "nosuch", "--text", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sra spans: error: --teacher-tokenizer: tokenizer 'nosuch': not a known name")
    assert err.count("not a known name") == 1 and len(err.splitlines()) == 1


def test_sra_config_checks_the_rules_across_sections_as_distill_does(capsys):
    argv = ["student=random:llama", "student_arch.hidden_size=48", "student_arch.num_heads=16",
            "student_arch.num_kv_heads=16"]
    assert main(["config", *argv]) == 2
    assert "random:llama needs an even head size" in capsys.readouterr().err
