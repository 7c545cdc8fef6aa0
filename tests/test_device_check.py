"""The device checks and the one-shot GPU script, run on the CPU: benchmarks/device_checks.py and
`bash benchmarks/gpu_check.sh --device cpu --tiny` (what a machine with a GPU runs with --device cuda)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sra_distill.paths import data_root

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("device_checks", REPO / "benchmarks" / "device_checks.py")
device_checks = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = device_checks
spec.loader.exec_module(device_checks)


def test_lean_attention_rows_match_eager_in_float32_and_bf16():
    lines = device_checks.check_lean_attention_rows("cpu")
    assert len(lines) == 12  # 3 families x 2 dtypes x 2 paddings


def test_span_kl_in_bf16_matches_float64_reference():
    assert len(device_checks.check_span_kl_bf16("cpu")) == 4


@pytest.mark.slow
def test_distill_step_with_bf16_precision_reuses_the_token_logits():
    (line,) = device_checks.check_distill_step_bf16("cpu")
    assert "float32 token logits" in line  # accelerate's fp32 copy of the bf16 head output, still reused


@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu_tiny(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--out", str(out),
         str(data_root() / "tokenizers")],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "PASS lean_rows" in done.stdout and "PASS distill_step_bf16" in done.stdout
    result = json.loads((out / "step_cost.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["floor", "sra", "sra_authors", "uld", "dskd", "mined", "sra_cached",
                                                   "uld_cached", "mined_cached"]
    assert result["failed"] == {} and result["setting"]["models"] == "paper-tiny"
    text = (out / "step_cost.txt").read_text()
    assert "paper s/step" in text and "| sra | " in text and "0.275" in text
    assert (out / "device_checks.txt").exists() and (out / "environment.txt").exists()


def test_gpu_check_refuses_a_missing_tokenizers_dir(tmp_path):
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "TOKENIZERS_DIR" in done.stderr
