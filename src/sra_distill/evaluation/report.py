"""`sra report OUTPUT_DIR`: one page about a run, as `report.md` and a self-contained `report.html`.

Sections, each built from what the run left in OUTPUT_DIR (a missing source gives a one-line note instead):

1. Summary: what was distilled, steps, the steps' wall time, the final losses, dev ROUGE-L first -> last, the
   scores before and after (`demo_scores.json` of `sra distill`'s demo, every `scores.json`), and where the files are.
2. Training: the loss-curve / dev-score figure (`plots.plot_loss_curves` -> `loss_curves.png`) and a summary of
   `metrics.jsonl` (steps, skipped non-finite steps, first/last loss, best dev ROUGE-L).
3. Evaluation: every `scores.json` below OUTPUT_DIR (`sra evaluate --output OUTPUT_DIR/eval...` writes them), one
   table each with the columns of `evaluate.scores_markdown`.
4. Samples: the first rows of the `predictions.jsonl` beside those scores; without any, greedy answers of `final/`
   to the first Dolly dev prompts (`evaluation.generate.generate`, `do_sample=False`, a few new tokens). A long prompt loses
   the middle of its context (`### Input:`), never its instruction or its end.
5. Data: `data_report.json` (records read / loaded / skipped, truncation counts and policy).
6. Settings, collapsed: `config.yaml` with only the `methods` section of the method the run used.

A folder with neither `config.yaml` nor `metrics.jsonl` is not a run: `sra report` says so (naming the run above
it, as for `final/`) and writes nothing. Both files are rendered from one list of blocks, so they always say the
same thing.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import yaml

from sra_distill.config import method_sections
from sra_distill.data.records import load_records
from sra_distill.errors import ConfigError, NotFoundError
from sra_distill.evaluation.generate import generate as generate_answers
from sra_distill.evaluation.model_card import refresh_model_cards
from sra_distill.evaluation.page import Block, evaluation_blocks, to_html, to_markdown, training_summary
from sra_distill.evaluation.plots import plot_loss_curves
from sra_distill.models.load import load_model
from sra_distill.run_files import read_metric_rows

DEFAULT_DEV_DATA = "dolly/dev.jsonl"
PROMPT_CHARS = 600  # longer prompts are shortened in the middle of their context
RUN_MARKERS = ("config.yaml", "metrics.jsonl")  # what `sra distill` writes into every output_dir first
# The context of an Alpaca-style prompt (records.py's templates): the part that gives way when a prompt is long.
_CONTEXT = re.compile(r"### Input:\n(.*)\n\n### Response:", re.DOTALL)
# Metrics rows fields that are not losses (the same ones `training_summary` leaves out of its "last ..." rows).
_NOT_LOSSES = ("loss", "step", "epoch", "skipped", "world_size", "lr", "projector_lr", "tokens_per_s", "step_s",
               "grad_norm", "dev_rouge_l")


# ------------------------------------------------------------------------------------------------------- checks
def _is_run(folder: Path) -> bool:
    return any((folder / name).is_file() for name in RUN_MARKERS)


def check_run_folder(out: Path) -> None:
    """Raise unless `out` is a run's output_dir: FileNotFoundError when missing; ConfigError (one line, naming
    the run above it when there is one, as for `final/` or `eval/`) when it holds neither config.yaml nor
    metrics.jsonl, so that a report is never written into a model or evaluation folder."""
    if not out.is_dir():
        raise NotFoundError(f"run directory {out} not found")
    if _is_run(out):
        return
    model = (out / "config.json").is_file() or (out / "adapter_config.json").is_file()
    what = "a model folder, not a run folder" if model else "not a run folder"
    run = next((p for p in out.absolute().parents if _is_run(p)), None)
    if run is not None:
        shown = run.relative_to(Path.cwd()) if run.is_relative_to(Path.cwd()) else run
        hint = f"the run is {shown}: sra report {shown}"
    else:
        hint = "give the output_dir of a `sra distill` run"
    raise ConfigError(f"{out} is {what} (no {' or '.join(RUN_MARKERS)}); {hint}")


# ------------------------------------------------------------------------------------------------------ summary
def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _wall_time(rows: list[dict]) -> str | None:
    times = [r["step_s"] for r in rows if "step_s" in r]
    last = rows[-1]["step"]
    if not times:
        return None
    if len(times) == last:
        return f"{_duration(sum(times))} (the {last} steps; loading, pairing and dev evaluation not counted)"
    # log_every > 1: metrics.jsonl holds some of the steps; their mean stands for the others.
    return f"about {_duration(sum(times) / len(times) * last)} (mean of {len(times)} logged step times x {last} steps)"


def _final_losses(rows: list[dict]) -> str | None:
    good = [r for r in rows if not r.get("skipped")]
    if not good:
        return None
    last = good[-1]
    parts = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k not in _NOT_LOSSES and isinstance(v, float))
    return f"**{last['loss']:.4g}** at step {last['step']}" + (f" ({parts})" if parts else "")


def _dev_curve(rows: list[dict]) -> str | None:
    dev = [(r["step"], r["dev_rouge_l"]) for r in rows if "dev_rouge_l" in r]
    if not dev:
        return None
    (s0, first), (s1, last) = dev[0], dev[-1]
    best_step, best = max(dev, key=lambda d: d[1])
    return f"{first:.2f} at step {s0} → **{last:.2f}** at step {s1} (best {best:.2f} at step {best_step})"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _score_rows(out: Path) -> list[list[str]]:
    """Scores before and after: `sra distill`'s demo scores, then the average of every `scores.json`."""
    rows = []
    demo = out / "demo_scores.json"
    if demo.is_file():
        scores = json.loads(demo.read_text(encoding="utf-8"))
        shown = ", ".join(f"{name} **{_mean(scores[name]):.2f}**" for name in ("teacher", "student before",
                                                                                 "student after") if scores.get(name))
        rows.append([f"dev ROUGE-L, {scores['records']} records of `{scores['dev_data']}`", shown])
    for path in sorted(out.rglob("scores.json")):
        scores = json.loads(path.read_text(encoding="utf-8"))
        model = Path(str(scores.get("model")))
        model_shown = f"{model.relative_to(out)}/" if model.is_relative_to(out) else str(model)
        rows.append([f"ROUGE-L x100, `{path.relative_to(out)}`",
                     f"average **{scores['average']:.2f}** over {', '.join(scores['sets'])} (model `{model_shown}`)"])
    return rows


_FILES = (  # what a run folder may hold, in reading order
    ("final", "the distilled student: `AutoModelForCausalLM.from_pretrained` / `sra evaluate --model`"),
    ("best", "the student at its best dev ROUGE-L"),
    ("checkpoints", "resumable checkpoints (`resume=true`)"),
    ("metrics.jsonl", "one JSON row per logged step"),
    ("loss_curves.png", "the curves below"),
    ("data_report.json", "records loaded and skipped, truncation"),
    ("config.yaml", "every setting (a valid `--config` file)"),
)


def _file_rows(out: Path) -> list[list[str]]:
    rows = [[f"`{name}/`" if (out / name).is_dir() else f"`{name}`", why]
            for name, why in _FILES if (out / name).exists()]
    rows += [[f"`{p.parent.relative_to(out)}/`", "an evaluation: scores.json, scores.md, predictions.jsonl"]
             for p in sorted(out.rglob("scores.json"))]
    return rows


def _summary(out: Path, cfg: dict, rows: list[dict]) -> list[Block]:
    blocks = [Block("h2", "Summary")]
    if cfg:
        blocks.append(Block("p", f"`{cfg.get('teacher')}` distilled into `{cfg.get('student')}` with "
                                 f"`{cfg.get('method')}` on `{cfg.get('train_data')}`."))
    facts = []
    if rows:
        planned = cfg.get("max_steps")
        facts.append(["steps", f"{rows[-1]['step']}" + (f" of {planned}" if planned else "")])
        facts += [[name, value] for name, value in (("wall time", _wall_time(rows)),
                                                     ("final loss", _final_losses(rows)),
                                                     ("dev ROUGE-L", _dev_curve(rows))) if value]
    facts += _score_rows(out)
    if facts:
        blocks.append(Block("table", header=["", "value"], rows=facts))
    files = _file_rows(out)
    if files:
        blocks += [Block("p", f"Files in `{out}`:"), Block("table", header=["file", "what"], rows=files)]
    return blocks


# ------------------------------------------------------------------------------------------------------ sections
def _used_method_only(cfg: dict) -> dict:
    """The settings without the `methods` sections of the methods the run did not use."""
    section = method_sections().get(cfg.get("method"))
    methods = cfg.get("methods")
    if not isinstance(methods, dict) or section not in methods:
        return cfg
    return {**cfg, "methods": {section: methods[section]}}


def _settings(out: Path) -> tuple[list[Block], dict]:
    path = out / "config.yaml"
    if not path.is_file():
        return [Block("h2", "Settings"), Block("p", "No config.yaml in this directory.")], {}
    cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    headline = (f"Teacher `{cfg.get('teacher')}` (tokenizer {cfg.get('teacher_tokenizer')}) → student "
                f"`{cfg.get('student')}` (tokenizer {cfg.get('student_tokenizer')}), method `{cfg.get('method')}`, "
                f"train data `{cfg.get('train_data')}`.")
    shown = yaml.safe_dump(_used_method_only(cfg), sort_keys=False, allow_unicode=True)
    details = Block("details", f"`config.yaml`, with only the `methods` section of `{cfg.get('method')}`",
                    children=[Block("code", shown)])
    return [Block("h2", "Settings"), Block("p", headline), details], cfg


def _training(out: Path, rows: list[dict]) -> list[Block]:
    blocks = [Block("h2", "Training")]
    if not rows:
        return blocks + [Block("p", "No metrics.jsonl rows in this directory.")]
    png = plot_loss_curves(out / "metrics.jsonl", out / "loss_curves.png")
    if png is not None:
        blocks.append(Block("image", "loss curves and dev ROUGE-L", path=png))
    blocks.append(Block("table", header=["", "value"], rows=training_summary(rows)))
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
        blocks.append(Block("p", f"Truncation over the {cut['examples']} records the run used; "
                                 f"policy: {cut['policy']}."))
        blocks.append(Block("table", header=["side", "prompt cut", "response cut", "EOS dropped"], rows=[
            [side, str(cut["prompt_truncated"][side]), str(cut["response_truncated"][side]),
             str(cut["eos_dropped"][side])] for side in ("student", "teacher")]))
    return blocks


def _cut_middle(text: str, keep: int) -> str:
    cut = len(text) - keep
    return text if cut <= 0 else f"{text[:keep - keep // 2]} [... {cut} characters ...] {text[len(text) - keep // 2:]}"


def shorten_prompt(prompt: str, limit: int = PROMPT_CHARS) -> str:
    """The prompt as the report shows it: whole up to `limit` characters; longer, the middle of its context (the
    `### Input:` section, or the whole text when it has none) gives way, so the instruction, the start and end of
    the context and the closing `### Response:` all stay."""
    if len(prompt) <= limit:
        return prompt
    context = _CONTEXT.search(prompt)
    start, end = context.span(1) if context else (0, len(prompt))
    keep = max(limit - (len(prompt) - (end - start)), limit // 4)  # a long instruction still leaves some context
    return prompt[:start] + _cut_middle(prompt[start:end], keep) + prompt[end:]


def _samples(out: Path, predictions: list[Path], cfg: dict, n: int, max_new_tokens: int, generate: bool) -> list[Block]:
    blocks = [Block("h2", "Sample generations")]
    if predictions:
        for path in predictions:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            first_seed = rows[0]["seed"] if rows else None
            shown = [r for r in rows if r["seed"] == first_seed][:n]
            blocks.append(Block("p", f"From `{path.relative_to(out)}` (seed {first_seed}):"))
            blocks += [Block("sample", fields={
                "set": r["set"], "prompt": shorten_prompt(r["prompt"]), "student": r["prediction"],
                "reference": r["references"][0], "ROUGE-L": f"{100 * r['rougeL']:.1f}"}) for r in shown]
        return blocks
    if n == 0:
        return blocks + [Block("p", "No samples requested.")]
    final = out / "final"
    if not generate or not (final / "config.json").is_file():
        why = "generation turned off" if generate is False else f"no predictions.jsonl and no model in {final}"
        return blocks + [Block("p", f"No samples ({why}).")]
    dev_data = cfg.get("dev_data") or DEFAULT_DEV_DATA
    records = [r for r in load_records(dev_data, limit=n) if r.prompt is not None]
    model, tokenizer = load_model(final, dtype="fp32", device="cpu")
    answers = generate_answers(model, tokenizer, [r.prompt for r in records], seed=cfg.get("seed", 42),
                               max_new_tokens=max_new_tokens, do_sample=False)
    blocks.append(Block("p", f"Greedy answers of `final/` to the first {len(records)} prompts of `{dev_data}` "
                             f"(max_new_tokens {max_new_tokens}):"))
    blocks += [Block("sample", fields={"prompt": shorten_prompt(r.prompt), "student": answer,
                                       "reference": r.references[0]})
               for r, answer in zip(records, answers)]
    return blocks


def build_blocks(output_dir: str | Path, samples: int = 3, max_new_tokens: int = 32, generate: bool = True
                 ) -> list[Block]:
    """The report's blocks, summary first and settings last (see the module docstring)."""
    out = Path(output_dir)
    check_run_folder(out)
    settings, cfg = _settings(out)
    metrics = out / "metrics.jsonl"
    rows = read_metric_rows(metrics) if metrics.is_file() else []
    evaluation, predictions = evaluation_blocks(out)
    return [
        Block("h1", f"Run report: {out.absolute().name}"),
        *_summary(out, cfg, rows), *_training(out, rows), *evaluation,
        *_samples(out, predictions, cfg, samples, max_new_tokens, generate), *_data(out), *settings,
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
        raise ConfigError(f"--samples must be >= 0 and --max-new-tokens >= 1, got {args.samples}, "
                          f"{args.max_new_tokens}")
    md, page = write_report(args.output_dir, args.samples, args.max_new_tokens, generate=not args.no_generate)
    print(f"wrote {md}\nwrote {page}")
    for card in refresh_model_cards(Path(args.output_dir)):  # the model cards gain the evaluation tables
        print(f"wrote {card}")
    return 0
