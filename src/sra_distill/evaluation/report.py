"""`sra report OUTPUT_DIR`: one page about a run, as `report.md` and a self-contained `report.html`.

Sections, each built from what the run left in OUTPUT_DIR (a missing source gives a one-line note instead):

1. Settings: `config.yaml` as saved by the engine.
2. Training: a summary of `metrics.jsonl` (steps, skipped non-finite steps, first/last loss, best dev ROUGE-L,
   throughput) and the loss-curve / dev-score figure (`plots.plot_loss_curves` -> `loss_curves.png`).
3. Evaluation: every `scores.json` below OUTPUT_DIR (`sra evaluate --output OUTPUT_DIR/eval...` writes them), one
   table each with the columns of `evaluate.scores_markdown`.
4. Data: `data_report.json` (records read / loaded / skipped, truncation counts and policy).
5. Samples: the first rows of the `predictions.jsonl` beside those scores; without any, greedy answers of `final/`
   to the first Dolly dev prompts (`evaluate.generate`, `do_sample=False`, a few new tokens).

Both files are rendered from one list of blocks, so they always say the same thing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from sra_distill.evaluation.model_card import refresh_model_cards
from sra_distill.evaluation.page import Block, evaluation_blocks, to_html, to_markdown, training_summary
from sra_distill.evaluation.plots import plot_loss_curves
from sra_distill.run_files import read_metric_rows

DEFAULT_DEV_DATA = "dolly/dev.jsonl"
PROMPT_CHARS = 400  # prompts are shown by their last characters (the instruction tail and "### Response:")


# ------------------------------------------------------------------------------------------------------ sections
def _settings(out: Path) -> tuple[list[Block], dict]:
    path = out / "config.yaml"
    if not path.is_file():
        return [Block("h2", "Settings"), Block("p", "No config.yaml in this directory.")], {}
    text = path.read_text(encoding="utf-8")
    cfg = yaml.safe_load(text) or {}
    headline = (f"Teacher `{cfg.get('teacher')}` (tokenizer {cfg.get('teacher_tokenizer')}) -> student "
                f"`{cfg.get('student')}` (tokenizer {cfg.get('student_tokenizer')}), method `{cfg.get('method')}`, "
                f"train data `{cfg.get('train_data')}`.")
    return [Block("h2", "Settings"), Block("p", headline), Block("code", text)], cfg


def _training(out: Path) -> list[Block]:
    blocks = [Block("h2", "Training")]
    metrics = out / "metrics.jsonl"
    rows = read_metric_rows(metrics) if metrics.is_file() else []
    if not rows:
        return blocks + [Block("p", "No metrics.jsonl rows in this directory.")]
    blocks.append(Block("table", header=["", "value"], rows=training_summary(rows)))
    png = plot_loss_curves(metrics, out / "loss_curves.png")
    if png is not None:
        blocks.append(Block("image", "loss curves and dev ROUGE-L", path=png))
    return blocks


def _data(out: Path) -> list[Block]:
    blocks = [Block("h2", "Data")]
    path = out / "data_report.json"
    if not path.is_file():
        return blocks + [Block("p", "No data_report.json in this directory.")]
    report = json.loads(path.read_text(encoding="utf-8"))
    skipped = report.get("skipped_empty_response", [])
    rows = [["source", str(report.get("source"))], ["records read", str(report.get("read"))],
            ["records loaded", str(report.get("loaded"))], ["skipped (empty response)", str(len(skipped))]]
    if skipped:
        rows.append(["skipped at lines", ", ".join(str(line) for _, line in skipped[:20])
                     + (", ..." if len(skipped) > 20 else "")])
    blocks.append(Block("table", header=["", "value"], rows=rows))
    cut = report.get("truncation")
    if cut:
        blocks.append(Block("p", f"Truncation over the {cut['examples']} records the run used; policy: {cut['policy']}."))
        blocks.append(Block("table", header=["side", "prompt cut", "response cut", "EOS dropped"], rows=[
            [side, str(cut["prompt_truncated"][side]), str(cut["response_truncated"][side]),
             str(cut["eos_dropped"][side])] for side in ("student", "teacher")]))
    return blocks


def _tail(text: str) -> str:
    return text if len(text) <= PROMPT_CHARS else "..." + text[-PROMPT_CHARS:]


def _samples(out: Path, predictions: list[Path], cfg: dict, n: int, max_new_tokens: int, generate: bool) -> list[Block]:
    blocks = [Block("h2", "Sample generations")]
    if predictions:
        for path in predictions:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            first_seed = rows[0]["seed"] if rows else None
            shown = [r for r in rows if r["seed"] == first_seed][:n]
            blocks.append(Block("p", f"From `{path.relative_to(out)}` (seed {first_seed}):"))
            blocks += [Block("sample", fields={
                "set": r["set"], "prompt": _tail(r["prompt"]), "student": r["prediction"],
                "reference": r["references"][0], "ROUGE-L": f"{100 * r['rougeL']:.1f}"}) for r in shown]
        return blocks
    if n == 0:
        return blocks + [Block("p", "No samples requested.")]
    final = out / "final"
    if not generate or not (final / "config.json").is_file():
        why = "generation turned off" if generate is False else f"no predictions.jsonl and no model in {final}"
        return blocks + [Block("p", f"No samples ({why}).")]
    from sra_distill.data.records import load_records
    from sra_distill.evaluation.evaluate import generate as generate_answers
    from sra_distill.models.load import load_model

    dev_data = cfg.get("dev_data") or DEFAULT_DEV_DATA
    records = [r for r in load_records(dev_data, limit=n) if r.prompt is not None]
    model, tokenizer = load_model(final, dtype="fp32", device="cpu")
    answers = generate_answers(model, tokenizer, [r.prompt for r in records], seed=cfg.get("seed", 42),
                               max_new_tokens=max_new_tokens, do_sample=False)
    blocks.append(Block("p", f"Greedy answers of `final/` to the first {len(records)} prompts of `{dev_data}` "
                             f"(max_new_tokens {max_new_tokens}):"))
    blocks += [Block("sample", fields={"prompt": _tail(r.prompt), "student": answer, "reference": r.references[0]})
               for r, answer in zip(records, answers)]
    return blocks


def build_blocks(output_dir: str | Path, samples: int = 3, max_new_tokens: int = 32, generate: bool = True
                 ) -> list[Block]:
    out = Path(output_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"run directory {out} not found")
    settings, cfg = _settings(out)
    evaluation, predictions = evaluation_blocks(out)
    return [
        Block("h1", f"Run report: {out}"),
        *settings, *_training(out), *evaluation, *_data(out),
        *_samples(out, predictions, cfg, samples, max_new_tokens, generate),
    ]


def write_report(output_dir: str | Path, samples: int = 3, max_new_tokens: int = 32, generate: bool = True
                 ) -> tuple[Path, Path]:
    """Write OUTPUT_DIR/report.md and report.html (see the module docstring); returns both paths."""
    out = Path(output_dir)
    blocks = build_blocks(out, samples, max_new_tokens, generate)
    md, page = out / "report.md", out / "report.html"
    md.write_text(to_markdown(blocks, out), encoding="utf-8")
    page.write_text(to_html(blocks), encoding="utf-8")
    return md, page


# --------------------------------------------------------------------------------------------------------- CLI
def run_report(args: argparse.Namespace) -> int:
    if args.samples < 0 or args.max_new_tokens < 1:
        raise ValueError(f"--samples must be >= 0 and --max-new-tokens >= 1, got {args.samples}, {args.max_new_tokens}")
    md, page = write_report(args.output_dir, args.samples, args.max_new_tokens, generate=not args.no_generate)
    print(f"wrote {md}\nwrote {page}")
    for card in refresh_model_cards(Path(args.output_dir)):  # the model cards gain the evaluation tables
        print(f"wrote {card}")
    return 0
