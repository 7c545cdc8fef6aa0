"""`sra report`: a run's settings, curves, evaluation tables, data report and samples, in markdown and HTML."""

import json
import shutil
from pathlib import Path

import pytest

from sra_distill.cli import main
from sra_distill.config import load_config
from sra_distill.evaluation.evaluate import evaluate_model
from sra_distill.evaluation.report import write_report
from sra_distill.models.load import load_model
from sra_distill.train.engine import Trainer

TINY = Path(__file__).resolve().parents[1] / "src/sra_distill/configs/tiny.yaml"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(TINY, [f"output_dir={out}", "max_train_examples=8", "batch_size=2", "max_length=64",
                             "max_prompt_length=32", "max_steps=2", "eval_every=2", "eval_examples=2",
                             "eval_max_new_tokens=4"])
    Trainer(cfg).train()
    return out


@pytest.fixture
def run_dir(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def metric_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_report_of_a_run_without_evaluation_generates_samples_from_final(run_dir):
    md_path, html_path = write_report(run_dir, samples=2, max_new_tokens=4)
    md, page = md_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")
    rows = metric_rows(run_dir)
    for heading in ("## Settings", "## Training", "## Evaluation (ROUGE-L x100)", "## Data", "## Sample generations"):
        assert heading in md
    assert "method: sra" in md and "teacher: random:llama" in md  # config.yaml verbatim
    assert f"| first loss | {rows[0]['loss']:.4g} |" in md and f"| last loss | {rows[-1]['loss']:.4g} |" in md
    assert f"| best dev ROUGE-L | {rows[-1]['dev_rouge_l']:.2f} (step 2) |" in md
    assert "![loss curves and dev ROUGE-L](loss_curves.png)" in md and (run_dir / "loss_curves.png").exists()
    assert "No scores.json below this directory" in md
    data = json.loads((run_dir / "data_report.json").read_text())
    assert f"| records loaded | {data['loaded']} |" in md
    cut = data["truncation"]
    assert f"| student | {cut['prompt_truncated']['student']} | {cut['response_truncated']['student']} |" in md
    assert "Greedy answers of `final/` to the first 2 prompts of `dolly/dev.jsonl`" in md
    assert md.count("**student:**") == 2
    assert "data:image/png;base64," in page and page.count('<div class="sample">') == 2
    assert "<h2>Data</h2>" in page and "method: sra" in page


def test_report_shows_evaluation_tables_and_their_predictions(run_dir):
    model, tokenizer = load_model(run_dir / "final", device="cpu")
    scores = evaluate_model(model, tokenizer, {"dolly": "dolly/valid.jsonl"}, seeds=[10, 20], max_examples=2,
                            output_dir=run_dir / "eval", progress=False, max_new_tokens=4)
    predictions = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    md_path, html_path = write_report(run_dir, samples=1)
    md = md_path.read_text(encoding="utf-8")
    s = scores["sets"]["dolly"]
    row = f"| dolly | 2 | {s['per_seed'][0]:.2f} | {s['per_seed'][1]:.2f} | {s['mean']:.2f} | {s['std']:.2f} |"
    assert row in md and f"| average |  |  |  | {scores['average']:.2f} |  |" in md
    assert "From `eval/predictions.jsonl` (seed 10):" in md and md.count("**student:**") == 1
    assert f"> {predictions[0]['prediction']}" in md
    assert "<td>dolly</td>" in html_path.read_text(encoding="utf-8")


def test_report_of_an_empty_directory_says_what_is_missing(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--no-generate"]) == 0
    md = (tmp_path / "report.md").read_text()
    for note in ("No config.yaml", "No metrics.jsonl rows", "No scores.json", "No data_report.json", "No samples"):
        assert note in md
    assert "wrote" in capsys.readouterr().out


def test_report_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "run directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--samples", "-1"]) == 2
    assert "--samples must be >= 0" in capsys.readouterr().err
