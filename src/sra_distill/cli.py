"""The `sra` command line: `sra distill`, `sra evaluate`, and the inspection tools."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import textwrap
import time
from dataclasses import dataclass


def _distill_parser(sub, populate: bool = True) -> None:
    # Listing every setting documents the methods' settings, whose dataclasses live beside torch code: only
    # `sra distill --help` pays for that import, not `sra --help` or the other commands.
    epilog = None
    if populate:
        from sra_distill.settings_doc import settings_help

        epilog = settings_help()
    p = sub.add_parser(
        "distill",
        help="distil a teacher into a student (no arguments: the embedded laptop-CPU default)",
        description=textwrap.fill(
            "Distil a teacher into a student with a different tokenizer. Settings come from the built-in defaults "
            "(the embedded demo), then --config FILE, then key=value overrides (dots for nested keys, e.g. "
            "methods.sra.geo_weight=10). `sra config ...` prints the resolved settings without running.", 100),
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML settings file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="setting overrides")
    p.set_defaults(func=_run_distill)


def _run_distill(args) -> int:
    from sra_distill.config import load_config
    from sra_distill.validation import validate_settings

    cfg = load_config(args.config, args.overrides)
    validate_settings(cfg)  # before the engine's imports: a bad setting answers in a moment
    from sra_distill.train.engine import Trainer

    started = time.perf_counter()
    trainer = Trainer(cfg)
    main = trainer.accelerator.is_main_process
    prompt = cfg.demo_prompt
    before = trainer.answer(prompt) if prompt and main else None
    dev, scores = _demo_dev_records(cfg) if main else None, {}
    if dev:
        scored = "the teacher and the untrained student" if trainer.teacher is not None else "the untrained student"
        print(f"Dev ROUGE-L on {len(dev)} {cfg.dev_data} records, seeds {cfg.demo_eval_seeds}, "
              f"{cfg.eval_max_new_tokens} new tokens: scoring {scored}...", flush=True)
        if trainer.teacher is not None:  # a method that never runs the teacher (SFT) loads none
            scores["teacher"] = trainer.dev_scores(dev, cfg.demo_eval_seeds, which="teacher")
        scores["student before"] = trainer.dev_scores(dev, cfg.demo_eval_seeds)
    result = trainer.train()
    if not main:
        return 0
    wall = time.perf_counter() - started
    print(f"\nDistilled {cfg.teacher} -> {cfg.student} with {cfg.method} in {result.steps} steps ({wall:.0f} s).")
    if cfg.lora.enabled and not cfg.lora.merge_on_save:
        print(f"  final student : {result.final_dir}  (a LoRA adapter on {cfg.student}: peft's "
              f"PeftModel.from_pretrained, or AutoModelForCausalLM.from_pretrained with peft installed)")
    else:
        print(f"  final student : {result.final_dir}  (AutoModelForCausalLM / AutoTokenizer .from_pretrained)")
    if result.best_dir:
        print(f"  best on dev   : {result.best_dir}")
    print(f"  metrics       : {result.metrics_path}")
    if result.plot_path:
        print(f"  loss curves   : {result.plot_path}")
    if any((result.output_dir / "checkpoints").glob("step-*")):  # none when save_every=0
        print(f"  checkpoints   : {result.output_dir / 'checkpoints'}")
    if result.last_metrics:
        shown = {k: v for k, v in result.last_metrics.items() if isinstance(v, float)}
        print("  last step     : " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    if dev:
        scores["student after"] = trainer.dev_scores(dev, cfg.demo_eval_seeds)
        print(f"\nDev ROUGE-L ({len(dev)} records of {cfg.dev_data}, mean ± std over seeds {cfg.demo_eval_seeds}):")
        for name, values in scores.items():
            print(f"  {name:<15}: {_mean_std(values)}   per seed: {', '.join(f'{v:.2f}' for v in values)}")
        (result.output_dir / "demo_scores.json").write_text(json.dumps(
            {"records": len(dev), "dev_data": cfg.dev_data, "seeds": cfg.demo_eval_seeds, **scores}, indent=1))
    if prompt:
        print(f"\nPrompt: {prompt.strip()}")
        print(f"Student before: {before!r}")
        print(f"Student after : {trainer.answer(prompt)!r}")
        if trainer.teacher is not None:
            print(f"Teacher       : {trainer.answer(prompt, which='teacher')!r}")
    return 0


def _demo_dev_records(cfg) -> list | None:
    if not (cfg.demo_eval_seeds and cfg.dev_data and cfg.demo_eval_examples > 0):
        return None
    from sra_distill.data.records import load_records

    return load_records(cfg.dev_data, limit=cfg.demo_eval_examples)


def _mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return f"{mean:5.2f} ± {std:.2f}"


def _config_parser(sub) -> None:
    p = sub.add_parser(
        "config",
        help="print the resolved settings as YAML (defaults, then --config FILE, then key=value overrides)",
        description="Resolve the settings as `sra distill` would (built-in defaults, then --config FILE, then "
        "key=value overrides), check them, and print them as YAML; the output is a valid --config file. "
        "`sra distill --help` lists every setting with its type, default and doc.",
    )
    p.add_argument("--config", help="YAML settings file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="setting overrides")
    p.set_defaults(func=_run_config)


def _run_config(args) -> int:
    import yaml

    from sra_distill.config import config_to_dict, load_config
    from sra_distill.train.trackers import tracker_names

    cfg = load_config(args.config, args.overrides)
    tracker_names(cfg.report_to)  # a tracker that is not installed is an error here too
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True), end="")
    return 0


@dataclass(frozen=True)
class LazyCommand:
    """A command whose arguments and code live in a module that imports torch: the module is imported only when
    the command runs (or its --help is asked for)."""

    help: str
    description: str | None
    module: str  # defines add_<name>_arguments(parser) and run_<name>(args)


def _lazy_parser(sub, name: str, command: LazyCommand, populate: bool) -> None:
    p = sub.add_parser(name, help=command.help, description=command.description)
    if populate:
        module = importlib.import_module(command.module)
        function_name = name.replace("-", "_")  # teacher-cache -> add_teacher_cache_arguments
        getattr(module, f"add_{function_name}_arguments")(p)
        p.set_defaults(func=getattr(module, f"run_{function_name}"))


def _vocab_parser(sub) -> None:
    p = sub.add_parser(
        "vocab",
        help="shared vocabulary of two tokenizers (exact and normalised); build MinED's vocabulary map ahead of time",
        description="Print the shared-vocabulary sizes SRA's span KL uses (exact string match, as the paper, and "
        "with word-start markers and byte tokens normalised), and with --mined-map compute and cache MinED's "
        "minimum-edit-distance vocabulary map (cached by content hash under $SRA_CACHE) so training starts at once.",
    )
    p.add_argument("--student-tokenizer", required=True, help="known tokenizer name or path")
    p.add_argument("--teacher-tokenizer", required=True, help="known tokenizer name or path")
    p.add_argument("--mined-map", action="store_true", help="also build and cache MinED's vocabulary map")
    p.set_defaults(func=_run_vocab)


def _run_vocab(args) -> int:
    from sra_distill.data.tokenization import load_tokenizer
    from sra_distill.data.vocab import overlap_report

    student, teacher = load_tokenizer(args.student_tokenizer), load_tokenizer(args.teacher_tokenizer)
    report = overlap_report(student, teacher)
    print(f"student {args.student_tokenizer}: {report['student_vocab']} tokens; "
          f"teacher {args.teacher_tokenizer}: {report['teacher_vocab']} tokens")
    print(f"shared vocabulary: {report['exact']} exact, {report['normalized']} normalised")
    if args.mined_map:
        from sra_distill.losses.mined_map import build_mined_map, mined_map_key

        started = time.perf_counter()
        mapping = build_mined_map(student, teacher)
        mapped = int((mapping >= 0).sum())
        print(f"MinED map: {mapped} of {mapping.numel()} teacher ids mapped to student ids, key "
              f"{mined_map_key(student, teacher)}, {time.perf_counter() - started:.1f} s")
    return 0


def _student_parser(sub) -> None:
    p = sub.add_parser(
        "student",
        help="build a pretrained student: a model's body with another tokenizer's vocabulary",
        description="Re-tokenise a pretrained model for another tokenizer: every decoder block is kept (or the "
        "ones --layers names), and each embedding row of the new vocabulary is the source row of the same text, "
        "or the mean of the source rows of its source tokenization (fast vocabulary transfer). The result is an "
        "ordinary Hugging Face folder; `student: from:MODEL` in a config builds the same thing automatically.",
    )
    p.add_argument("--from", dest="source", required=True,
                   help="packaged model name (smollm2-135m-instruct), model directory or .gguf file")
    p.add_argument("--tokenizer", required=True, help="known tokenizer name (llama2, gpt2, qwen2, ...) or folder")
    p.add_argument("--layers", help="decoder blocks to keep: a count (evenly spaced, first and last kept) or a "
                   "list such as 0-13,28,29; default all. Pruning a small model this way breaks it (README)")
    p.add_argument("--output", required=True, help="folder to write (must not exist or be empty)")
    p.set_defaults(func=_run_student)


def _run_student(args) -> int:
    from pathlib import Path

    from sra_distill.models.student import build_student, save_student

    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"--output {output}: exists and is not an empty folder")
    started = time.perf_counter()
    model, tok, report = build_student(args.source, args.tokenizer, args.layers)
    save_student(model, tok, report, output)
    params = sum(p.numel() for p in model.parameters())
    print(f"student: {args.source} body, {args.tokenizer} vocabulary ({len(tok)} tokens), "
          f"{params / 1e6:.1f}M parameters, {time.perf_counter() - started:.0f} s")
    print(f"  {report.summary()}")
    print(f"  written to {output} (AutoModelForCausalLM / AutoTokenizer .from_pretrained)")
    return 0


LAZY_COMMANDS = {
    "evaluate": LazyCommand("ROUGE-L of a model on the paper's test sets (or your own)", None, "sra_distill.evaluation.evaluate"),
    "spans": LazyCommand(
        "show how two tokenizers split a text and the spans SRA aligns (terminal, optional HTML page)",
        "Tokenize a text (--text, as a response) or records (--data) with both tokenizers, as training does, and "
        "show the shared spans: colours per span in the terminal (plain with --no-color or when not a terminal), "
        "an HTML page with both sides (--html), and statistics (spans per token, multi-token spans, shared "
        "vocabulary).",
        "sra_distill.data.spans_view",
    ),
    "report": LazyCommand(
        "a markdown + HTML report of a run: settings, loss and dev curves, eval tables, data, samples",
        "Write OUTPUT_DIR/report.md and report.html from what a run left there: config.yaml, metrics.jsonl "
        "(plots), eval*/scores.json, data_report.json, and sample answers (predictions.jsonl, or a few greedy "
        "answers of final/ to Dolly dev prompts).",
        "sra_distill.evaluation.report",
    ),
    "teacher-cache": LazyCommand(
        "run the teacher once over the training data and store what the methods read (train with teacher_cache=DIR)",
        "Run the frozen teacher over the records a config trains on, paired as training pairs them, and store per "
        "record the hidden states, attention rows (and logits, when not recomputable from the head) the method(s) "
        "read, plus the teacher's LM head: safetensors shards and a manifest written last. An interrupted build "
        "resumes; `sra distill ... teacher_cache=DIR` then loads no teacher.",
        "sra_distill.train.teacher_cache",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `sra` parser. With `command`, only that command's arguments are defined: the others' live in modules that
    import torch and transformers, which `sra --help` and argument errors should not wait for."""
    parser = argparse.ArgumentParser(prog="sra", description="Cross-tokenizer knowledge distillation (SRA and baselines)")
    sub = parser.add_subparsers(dest="command", required=True)
    _distill_parser(sub, populate=command is None or command == "distill")
    _config_parser(sub)
    for name, lazy in LAZY_COMMANDS.items():
        _lazy_parser(sub, name, lazy, populate=command is None or command == name)
    _vocab_parser(sub)
    _student_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")  # the first word; "" for `sra --help`
    args = build_parser(command).parse_args(argv)
    from sra_distill.config import ConfigError
    from sra_distill.data.records import DataError
    from sra_distill.train.runfolder import RunStopped

    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:  # bad settings, data, files or tokenizers
        print(f"sra {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # training diverged (max_bad_steps non-finite steps in a row)
        print(f"sra {args.command}: stopped: {exc}", file=sys.stderr)
        return 3
    except RunStopped as exc:  # SIGINT / SIGTERM: the engine saved a checkpoint and printed how to continue
        return exc.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C (or one outside training): stop without saving
        print(f"sra {args.command}: aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
