"""The README's library examples run as printed: the functional SRA loss and the drop-in Hugging Face Trainer."""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

README = Path(__file__).resolve().parents[1] / "README.md"


def example_after(marker: str) -> str:
    """The first ```python block after `marker` in the README."""
    text = README.read_text()
    start = text.index(marker)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_functional_loss_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(example_after("**The functional loss.**"), "README functional example", "exec"), scope)
    out = scope["out"]
    assert set(out) == {"cos", "geo", "kl", "span_total"} and all(torch.isfinite(v) for v in out.values())
    assert scope["projector"].weight.grad is not None and scope["projector"].weight.grad.abs().sum() > 0
    assert "span_total" in capsys.readouterr().out


@pytest.mark.slow
def test_hf_trainer_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(example_after("**A drop-in `transformers.Trainer`.**"), "README Trainer example", "exec"), scope)
    trainer = scope["trainer"]
    assert trainer.state.global_step == 4
    final = tmp_path / "runs" / "hf-sra" / "final"
    saved = load_file(str(final / "distill_method.safetensors"))
    for name, value in trainer.distill_method.state_dict().items():
        assert torch.equal(saved[name].to(value.device), value), name
    assert (tmp_path / "runs" / "hf-sra" / "checkpoint-2" / "distill_method.safetensors").is_file()
