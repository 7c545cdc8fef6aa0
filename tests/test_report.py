"""`sra report`: a run's summary, curves, evaluation tables, samples, data report and settings, in markdown and
HTML; and a folder that is not a run refused."""

import json
import re
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import yaml

from sra_distill.cli import main
from sra_distill.config import load_config
from sra_distill.evaluation.evaluate import evaluate_model
from sra_distill.evaluation.plots import loss_figure
from sra_distill.evaluation.report import shorten_prompt, write_report
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
    for heading in ("## Summary", "## Training", "## Evaluation (ROUGE-L x100)", "## Data", "## Sample generations",
                    "## Settings"):
        assert heading in md
    assert "method: sra" in md and "teacher: random:llama" in md  # config.yaml as saved
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


def test_report_opens_with_a_summary_and_ends_with_the_settings_of_the_method_in_use(run_dir):
    (run_dir / "demo_scores.json").write_text(json.dumps(  # as `sra distill`'s demo writes it
        {"records": 4, "dev_data": "dolly/dev.jsonl", "seeds": [1, 2], "teacher": [30.0, 32.0],
         "student before": [10.0, 12.0], "student after": [20.0, 24.0]}))
    md_path, html_path = write_report(run_dir, samples=0)
    md, page = md_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")
    rows = metric_rows(run_dir)
    headings = re.findall(r"^## (.+)$", md, flags=re.MULTILINE)
    assert headings[0] == "Summary" and headings[1] == "Training" and headings[-1] == "Settings"
    summary = md[md.index("## Summary"):md.index("## Training")]
    assert "| steps | 2 of 2 |" in summary
    assert f"| wall time | {round(sum(r['step_s'] for r in rows))} s (the 2 steps;" in summary
    assert f"| final loss | **{rows[-1]['loss']:.4g}** at step 2 (ce {rows[-1]['ce']:.4g}," in summary
    assert "teacher **31.00**, student before **11.00**, student after **22.00**" in summary
    assert "| `final/` | the distilled student" in summary and "| `config.yaml` |" in summary
    assert md.index("![loss curves") < md.index("| steps logged |")  # the curves before the long table

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert {"sra", "uld", "mined", "dskd"} <= set(saved["methods"])
    settings = md[md.index("## Settings"):]
    shown = yaml.safe_load(settings[settings.index("```yaml") + 7:settings.index("```", settings.index("```yaml") + 7)])
    assert shown["methods"] == {"sra": saved["methods"]["sra"]}  # the other methods' sections left out
    assert {k: v for k, v in shown.items() if k != "methods"} == {k: v for k, v in saved.items() if k != "methods"}
    assert re.search(r"<details><summary>.*</summary><pre>[^<]*methods:\n  sra:", page)  # collapsed


def test_report_html_renders_markdown(run_dir):
    _, html_path = write_report(run_dir, samples=0)
    page = html_path.read_text(encoding="utf-8")
    assert "<code>random:llama</code>" in page and "<strong>" in page
    outside_pre = re.sub(r"<pre>.*?</pre>", "", page, flags=re.DOTALL)
    assert "`" not in outside_pre and "**" not in outside_pre


def test_shorten_prompt_keeps_the_instruction_and_cuts_the_middle_of_the_context():
    instruction = "When did Virgin Australia start operating?"
    context = "Virgin Australia is an airline. " + "It flies to many cities. " * 60 + "It is based in Brisbane."
    prompt = (f"Below is an instruction.\n\n### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n"
              "### Response:\n")
    shown = shorten_prompt(prompt, limit=400)
    assert len(shown) < 440 and f"### Instruction:\n{instruction}" in shown
    assert "### Input:\nVirgin Australia is an airline." in shown and shown.endswith("Brisbane.\n\n### Response:\n")
    assert f"[... {len(prompt) - 400} characters ...]" in shown
    assert shorten_prompt("short prompt", limit=400) == "short prompt"
    long_instruction = "Explain " + "this and that, " * 60 + "in one line."  # no context: the whole middle gives way
    cut = shorten_prompt(long_instruction, limit=200)
    assert cut.startswith("Explain this") and cut.endswith("in one line.") and len(cut) < 240


def test_loss_plot_legend_beside_the_curves_and_integer_step_ticks(run_dir):
    rows = metric_rows(run_dir)
    for shown in (rows, rows[:1]):  # two steps (dev ROUGE-L at the second), and a single step
        fig = loss_figure(shown)
        fig.canvas.draw()
        losses = fig.axes[0]
        legend = losses.get_legend()
        assert [t.get_text() for t in legend.get_texts()] == sorted(["loss", "ce", "cos", "geo", "kl", "distill"])
        assert not legend.get_window_extent().overlaps(losses.get_window_extent())
        for ax in fig.axes:  # steps 1 and 2: ticks 1.0, 1.2, ... would read as fractional steps
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks)
        plt.close(fig)


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
    # The first valid record has a long context: its question is shown, the middle of the context is not.
    question = predictions[0]["prompt"].split("### Instruction:\n")[1].split("\n")[0]
    assert f"> {question}" in md and "characters ...]" in md and "> ### Response:" in md
    average = f"average **{scores['average']:.2f}** over dolly (model `final/`)"
    assert f"| ROUGE-L x100, `eval/scores.json` | {average} |" in md
    assert "<td>dolly</td>" in html_path.read_text(encoding="utf-8")


def test_report_of_a_run_with_only_its_settings_says_what_is_missing(tmp_path, capsys):
    shutil.copy(TINY, tmp_path / "config.yaml")
    assert main(["report", str(tmp_path), "--no-generate"]) == 0
    md = (tmp_path / "report.md").read_text()
    for note in ("No metrics.jsonl rows", "No scores.json", "No data_report.json", "No samples"):
        assert note in md
    assert "wrote" in capsys.readouterr().out


def test_report_refuses_a_folder_that_is_not_a_run_and_writes_nothing(run_dir, tmp_path, capsys):
    final = run_dir / "final"
    before = {p: p.read_bytes() for p in final.iterdir()}
    assert main(["report", str(final)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{final} is a model folder, not a run folder" in err
    assert err.endswith(f"sra report {run_dir}")  # the run to report on instead
    assert {p: p.read_bytes() for p in final.iterdir()} == before  # no report, no model card rewritten

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    assert f"{empty} is not a run folder" in capsys.readouterr().err
    assert not any(empty.iterdir())


def test_report_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "run directory" in capsys.readouterr().err
    shutil.copy(TINY, tmp_path / "config.yaml")
    assert main(["report", str(tmp_path), "--samples", "-1"]) == 2
    assert "--samples must be >= 0" in capsys.readouterr().err
