"""The `sra` entry points: help for every command, `sra vocab`, and config errors through `sra distill`."""

import subprocess
import sys

import pytest

from sra_distill.cli import main


@pytest.mark.parametrize("command", ["distill", "config", "evaluate", "spans", "report", "vocab", "student", "doctor"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: sra " + command in capsys.readouterr().out


def test_vocab_reports_exact_and_normalised_overlap(capsys):
    assert main(["vocab", "--student-tokenizer", "gpt2", "--teacher-tokenizer", "llama2"]) == 0
    out = capsys.readouterr().out
    assert "student gpt2: 50257 tokens" in out and "teacher llama2: 32000 tokens" in out
    exact, normalised = [int(x) for x in out.split("shared vocabulary: ")[1].replace(" exact,", "").split()[:2]]
    assert 0 < exact < normalised


def test_unknown_setting_is_refused_with_its_name(capsys):
    assert main(["distill", "--config", "tiny", "methods.sra.geo_wieght=10"]) == 2
    assert "methods.sra.geo_wieght" in capsys.readouterr().err


def test_bad_value_is_refused_with_its_key(capsys):
    assert main(["distill", "--config", "tiny", "batch_size=many"]) == 2
    assert "batch_size: expected an integer" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "sra_distill", "--help"], capture_output=True, text=True, check=True)
    assert "distill" in out.stdout and "evaluate" in out.stdout
