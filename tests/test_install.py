"""The wheel works from any folder (issue 29): build it, install it into a fresh venv, and from a folder outside the
checkout run `sra doctor`, `sra config --config tiny` and a 2-step tiny distillation with SRA_DATA_ROOT set.

The venv gets the wheel alone (`--no-deps`); its dependencies are the tested stack this suite runs on, made visible
through a `.pth` line (what `--system-site-packages` does for a base interpreter), so the check takes seconds and
needs no network. The package itself, its configs and its entry point come from the wheel only.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from sra_distill.paths import data_root

ROOT = Path(__file__).resolve().parents[1]


def _build_wheel(tmp: Path) -> Path:
    """Build from a copy of the sources, so the checkout gains no build/ or egg-info folder."""
    source = tmp / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp / "wheels")], check=True, capture_output=True, text=True)
    return next((tmp / "wheels").glob("sra_distill-*.whl"))


def _fresh_venv(tmp: Path, wheel: Path) -> Path:
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "tested_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, text=True)
    return venv


@pytest.mark.slow
def test_wheel_installed_in_a_fresh_venv_runs_from_another_folder(tmp_path):
    venv = _fresh_venv(tmp_path, _build_wheel(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "SRA_DATA_ROOT": str(data_root()), "SRA_CACHE": str(tmp_path / "cache"),
           "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # the checkout's src/ must not be importable

    def sra(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "sra"), *args], cwd=elsewhere, env=env, capture_output=True,
                              text=True, timeout=300)

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import sra_distill; print(sra_distill.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)), where  # the installed package, not the checkout

    doctor = sra("doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert f"SRA_DATA_ROOT={data_root()}" in doctor.stdout and "usable" in doctor.stdout

    config = sra("config", "--config", "tiny")
    assert config.returncode == 0, config.stderr
    assert "teacher: random:llama" in config.stdout and "student_tokenizer: gpt2" in config.stdout

    run = sra("distill", "--config", "tiny", "max_steps=2", "output_dir=run")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert (elsewhere / "run" / "final" / "config.json").is_file()
    assert "warning: untested library versions" not in run.stderr  # the tested stack: no warning
    assert "Traceback" not in run.stderr
