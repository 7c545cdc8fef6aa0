"""User errors versus bugs: the `sra` command prints a `UserError` as one line (exit 2) and lets every other
exception through with its traceback; the places that check user input raise the user-facing types."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import sra_distill.config as config_module
from sra_distill.cli import main
from sra_distill.data.tokenization import load_tokenizer
from sra_distill.errors import ConfigError, DataError, ModelSourceError, NotFoundError, RunFolderError, UserError
from sra_distill.evaluation import evaluate as evaluate_module
from sra_distill.models.load import load_model

ROOT = Path(__file__).resolve().parents[1]


def test_user_error_types_stay_value_errors_and_not_found_is_a_file_error():
    for kind in (ConfigError, DataError, ModelSourceError, NotFoundError, RunFolderError):
        assert issubclass(kind, UserError) and issubclass(kind, ValueError)
    assert issubclass(RunFolderError, ConfigError) and issubclass(NotFoundError, FileNotFoundError)
    assert config_module.ConfigError is ConfigError  # the name the config code has always raised


def test_a_user_error_prints_one_line_and_exits_2(tmp_path, capsys):
    assert main(["config", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"sra config: error: config {tmp_path / 'missing.yaml'}: no such file, nor a packaged "
                                f"config name (demo, demo_paper_exact, recommended, recommended_mined, tiny)"]


def test_an_internal_value_error_is_not_passed_off_as_a_user_error(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(config_module, "load_config", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["config"])
    assert "error:" not in capsys.readouterr().err


def test_an_internal_error_prints_its_traceback():
    script = ("import sys, sra_distill.config as c\n"
              "def broken(*args, **kwargs):\n    raise ValueError('an internal bug')\n"
              "c.load_config = broken\n"
              "from sra_distill.cli import main\nsys.exit(main(['config']))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr and "ValueError: an internal bug" in done.stderr
    assert "sra config: error:" not in done.stderr


def test_sra_evaluate_passes_internal_errors_through(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise KeyError("an internal bug")

    monkeypatch.setattr(evaluate_module, "parse_seeds", broken)
    with pytest.raises(KeyError, match="an internal bug"):
        main(["evaluate", "--model", "random:gpt2", "--output", str(tmp_path)])


def test_models_and_tokenizers_that_are_not_there_raise_not_found(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError, match="no config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(NotFoundError, match="GGUF file"):
        load_model(tmp_path / "model.gguf")
    with pytest.raises(NotFoundError, match="not a known name"):
        load_tokenizer(str(tmp_path / "no-such-tokenizer"))
    with pytest.raises(ConfigError, match="needs a tokenizer setting"):
        load_model("random:gpt2")
