"""The `sra` command line: `sra distill`, `sra evaluate`, and the inspection tools.

This module imports nothing that loads torch or transformers, so that `sra --help`, every command's --help and
argument errors answer at once: the modules that do are imported inside the functions that run a command.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from sra_distill.environment import doctor_checks, version_warning
from sra_distill.errors import ConfigError, RunStopped, UserError
from sra_distill.evaluation.suites import DEFAULT_SEEDS, SUITES
from sra_distill.paths import config_names, resolve_config


def _distill_parser(sub) -> None:
    # Every setting, listed from the settings' dataclasses by `python -m sra_distill.settings_doc` into a file that
    # ships with the package (a test keeps it current): reading the dataclasses here would import torch.
    epilog = (Path(__file__).with_name("settings_help.txt")).read_text(encoding="utf-8")
    p = sub.add_parser(
        "distill",
        help="distil a teacher into a student (no arguments: the embedded laptop-CPU default)",
        description=textwrap.fill(
            "Distil a teacher into a student with a different tokenizer. Settings come from the built-in defaults "
            "(the embedded demo), then --config FILE, then key=value overrides (dots for nested keys, e.g. "
            "methods.sra.geo_weight=10). `sra config ...` prints the resolved settings without running.", 100),
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _config_argument(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="setting overrides")
    p.set_defaults(func=_run_distill)


def _config_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"YAML settings file, or a packaged one by name: {', '.join(config_names())}")


def _load_settings(args):
    """The settings of `sra distill` / `sra config`: `--config` as a file or a packaged name, then the overrides."""
    from sra_distill.config import load_config
    return load_config(resolve_config(args.config) if args.config else None, args.overrides)


def _run_distill(args) -> int:
    from sra_distill.validation import validate_settings

    cfg = _load_settings(args)
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
    tensorboard = result.output_dir / "tensorboard"  # where trackers.build_trackers points report_to=[tensorboard]
    if "tensorboard" in cfg.report_to and tensorboard.is_dir():
        print(f"  tensorboard   : {tensorboard}  (tensorboard --logdir {tensorboard})")
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


def run_config(args) -> int:
    from sra_distill.config import config_to_dict
    from sra_distill.train.trackers import tracker_names
    from sra_distill.validation import check_combinations

    cfg = _load_settings(args)
    check_combinations(cfg)  # the rules across sections too, as `sra distill` checks them before anything loads
    tracker_names(cfg.report_to)  # a tracker that is not installed is an error here too
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True), end="")
    return 0


def run_vocab(args) -> int:
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


def run_student(args) -> int:
    from sra_distill.models.student import build_student, save_student
    from sra_distill.validation import set_hub_offline

    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"--output {output}: exists and is not an empty folder; name a new one")
    if not args.allow_download:
        set_hub_offline()  # a name that is not cached fails at once instead of retrying HTTP requests
    started = time.perf_counter()
    model, tok, report = build_student(args.source, args.tokenizer, args.layers, allow_download=args.allow_download)
    save_student(model, tok, report, output)
    params = sum(p.numel() for p in model.parameters())
    print(f"student: {args.source} body, {args.tokenizer} vocabulary ({len(tok)} tokens), "
          f"{params / 1e6:.1f}M parameters, {time.perf_counter() - started:.0f} s")
    print(f"  {report.summary()}")
    print(f"  written to {output} (AutoModelForCausalLM / AutoTokenizer .from_pretrained)")
    return 0


def run_doctor(args) -> int:
    checks = doctor_checks()
    for check in checks:
        mark = "ok" if check.ok else ("MISSING" if check.needed else "note")
        print(f"{check.topic:<28} {mark:<8} {check.found}")
    missing = [check.topic for check in checks if check.needed and not check.ok]
    if missing:
        print(f"not usable: {', '.join(missing)} (see above)")
        return 1
    print("usable: `sra distill --config tiny` runs here")
    return 0


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """`sra evaluate`'s options (defined here, free of torch, so that --help answers at once)."""
    parser.add_argument("--model", required=True,
                        help="directory saved with save_pretrained (student or teacher), or any model setting form "
                             "(packaged name, .gguf file, from:MODEL with --tokenizer)")
    parser.add_argument("--tokenizer", help="tokenizer name or folder, if the model directory has none")
    parser.add_argument("--data", action="append", metavar="[NAME=]FILE",
                        help="jsonl eval file (repeatable); name from the file stem or its folder")
    parser.add_argument("--suite", action="append", choices=sorted(SUITES),
                        help="named set of eval files; 'paper' = Dolly, Self-Instruct, Vicuna, S-NI, DialogSum "
                             "(the default when no --data is given)")
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                        help="comma-separated sampling seeds, one generation run each (default: %(default)s)")
    parser.add_argument("--max-examples", type=int, help="evaluate only the first N examples of each set "
                        "(default: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default: %(default)s)")
    parser.add_argument("--max-prompt-tokens", type=int, default=256,
                        help="prompt tokens kept, the last ones (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="longest generated answer, tokens (default: %(default)s)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--dtype", default="auto", help="auto (as saved), fp32, bf16 or fp16 (default: %(default)s)")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's choice); 1 is much faster on a busy machine")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--allow-download", action="store_true",
                        help="let transformers fetch --model from the model hub (default: local files and the hub "
                             "cache only)")
    parser.add_argument("--output", required=True, help="folder for predictions.jsonl, scores.json, scores.md")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the scores of another model already in --output (default: refuse)")


def add_spans_arguments(parser: argparse.ArgumentParser) -> None:
    """`sra spans`'s options."""
    parser.add_argument("--student-tokenizer", required=True, help="known tokenizer name (gpt2, llama2, ...) or folder")
    parser.add_argument("--teacher-tokenizer", required=True, help="likewise")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="a text to split (it plays the response)")
    source.add_argument("--data", help="jsonl records (relative paths resolve against the data root)")
    parser.add_argument("--max-records", type=int, default=3, help="records of --data to show (default 3)")
    parser.add_argument("--max-length", type=int, default=512, help="prompt + response tokens per side")
    parser.add_argument("--max-prompt-length", type=int, default=256, help="prompt tokens kept per side")
    parser.add_argument("--html", metavar="OUT.html", help="also write an HTML page with both sides and their spans")
    parser.add_argument("--no-color", action="store_true", help="plain text (also when stdout is not a terminal)")


def add_teacher_cache_arguments(parser: argparse.ArgumentParser) -> None:
    _config_argument(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="setting overrides, as for sra distill")
    parser.add_argument("--output", required=True, help="cache folder (new, or an unfinished build to resume)")
    parser.add_argument("--methods", help="comma-separated methods the cache must serve (default: the config's "
                        "method), e.g. sra,uld,mined,dskd,multilevel_ot")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"),  # the dtype words of models.load.DTYPES
                        help="stored dtype of the states (default: teacher_precision; fp32 for exact checks)")
    parser.add_argument("--records-per-shard", type=int, default=256,
                        help="records per safetensors shard, the unit a resumed build keeps (default 256)")
    parser.add_argument("--overwrite", action="store_true", help="delete a cache already in --output first")


def _count_or_all(text: str) -> int | None:
    """An example count: a positive integer, or `all` (None)."""
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or all, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or all, got {text!r}")
    return value


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """`sra compare`'s options. The CPU-sized protocol defaults are stated in each option's help."""
    _config_argument(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="base setting overrides shared by every candidate (the pair, the data, the budget)")
    parser.add_argument("--candidates", help="comma-separated methods, each a candidate named after it "
                        "(e.g. sft,sra,mined,uld,alm,dskd,multilevel_ot)")
    parser.add_argument("--candidate", action="append", default=[], metavar="NAME=key=value[,key=value]",
                        help="a candidate given by its overrides (repeatable), e.g. "
                             "'sra_mean=method=sra,methods.sra.kl_normalization=mean'")
    parser.add_argument("--seeds", default="42,43,44", help="training seeds of every candidate (default %(default)s)")
    parser.add_argument("--output", required=True,
                        help="comparison folder: new, or one to resume or extend with candidates and seeds")
    parser.add_argument("--runs-dir", help="where the run folders (models, predictions) go (default OUTPUT/runs); "
                        "the output folder then holds only the small files worth keeping")
    parser.add_argument("--teacher", choices=("tuned", "raw"), default="tuned",
                        help="tuned (default, the paper's protocol): fine-tune the teacher on the training data "
                             "first, once, cached; raw: distil from the teacher as it is")
    parser.add_argument("--tune-steps", type=int, default=160, help="teacher tuning steps (default %(default)s)")
    parser.add_argument("--tune-lr", type=float, default=5e-5, help="teacher tuning learning rate "
                        "(default %(default)s)")
    parser.add_argument("--dev", action="append", metavar="NAME=FILE",
                        help="dev set(s) where the best candidate is chosen (default dolly-dev=dolly/dev.jsonl)")
    parser.add_argument("--dev-examples", type=_count_or_all, default=50,
                        help="first N dev examples, or all (default %(default)s)")
    parser.add_argument("--dev-seeds", default="10,20", help="dev sampling seeds (default %(default)s)")
    parser.add_argument("--test", action="append", metavar="NAME=FILE",
                        help="test set(s) where candidates are judged (default dolly and self-inst; "
                             "--test-suite paper for the paper's five)")
    parser.add_argument("--test-suite", choices=sorted(SUITES), help="the paper's five test sets")
    parser.add_argument("--test-examples", type=_count_or_all, default=100,
                        help="first N examples of each test set, or all (default %(default)s; the paper: all)")
    parser.add_argument("--test-seeds", default="10,20,30",
                        help="test sampling seeds (default %(default)s; the paper: 10,20,30,40,50)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default %(default)s (the paper: 256)")
    parser.add_argument("--eval-batch-size", type=int, default=50, help="prompts generated together")
    parser.add_argument("--references", default="teacher",
                        help="reference rows scored once, comma-separated: teacher, student (the student before "
                             "training); 'none' for neither (default %(default)s)")
    parser.add_argument("--no-teacher-cache", action="store_true",
                        help="run the live teacher in every run instead of a cache built once per method")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each trained run's resumable checkpoints (weights and optimiser state, about 3x "
                             "its final weights); by default they are deleted once the run has trained, final/ kept")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (the run lines stay)")
    parser.add_argument("--report-only", action="store_true", help="rewrite compare.md and compare.png, run nothing")


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """`sra report`'s options."""
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="a run's output_dir")
    parser.add_argument("--samples", type=int, default=3, help="sample generations to show (default 3)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="length of generated samples (default 32)")
    parser.add_argument("--no-generate", action="store_true",
                        help="never generate samples (only show predictions.jsonl rows if present)")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    _config_argument(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="setting overrides")


def add_vocab_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--student-tokenizer", required=True, help="known tokenizer name or path")
    parser.add_argument("--teacher-tokenizer", required=True, help="known tokenizer name or path")
    parser.add_argument("--mined-map", action="store_true", help="also build and cache MinED's vocabulary map")


def add_student_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", required=True,
                        help="packaged model name (smollm2-135m-instruct), model directory or .gguf file")
    parser.add_argument("--tokenizer", required=True, help="known tokenizer name (llama2, gpt2, qwen2, ...) or folder")
    parser.add_argument("--layers", help="decoder blocks to keep: a count (evenly spaced, first and last kept) or "
                        "a list such as 0-13,28,29; default all. Pruning a small model this way breaks it "
                        "(docs/method.md)")
    parser.add_argument("--output", required=True, help="folder to write (must not exist or be empty)")
    parser.add_argument("--allow-download", action="store_true",
                        help="let transformers fetch --from from the model hub (default: local files and the hub "
                             "cache)")


def add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    """`sra doctor` takes no options."""


@dataclass(frozen=True)
class Command:
    """A subcommand: its options are defined here, free of torch, and the module that runs it (`run_<name>(args)`)
    is imported only when it runs, so that --help and argument errors answer at once."""

    help: str
    description: str
    arguments: Callable[[argparse.ArgumentParser], None]
    module: str  # defines run_<name>(args)


def _command_parser(sub, name: str, command: Command) -> None:
    p = sub.add_parser(name, help=command.help, description=command.description)
    command.arguments(p)
    function = f"run_{name.replace('-', '_')}"  # teacher-cache -> run_teacher_cache
    p.set_defaults(func=functools.partial(_run_command, command.module, function))


def _run_command(module: str, function: str, args) -> int:
    return getattr(importlib.import_module(module), function)(args)


COMMANDS = {
    "config": Command(
        "print the resolved settings as YAML (defaults, then --config FILE, then key=value overrides)",
        "Resolve the settings as `sra distill` would (built-in defaults, then --config FILE, then "
        "key=value overrides), check them, and print them as YAML; the output is a valid --config file. "
        "`sra distill --help` lists every setting with its type, default and doc.",
        add_config_arguments, "sra_distill.cli",
    ),
    "evaluate": Command(
        "ROUGE-L of a model on the paper's test sets (or your own)",
        "Generate answers with a model (a saved student or teacher, a packaged model, a .gguf file) for every "
        "record of the test sets and every seed, and score them with ROUGE-L F1 as the SRA paper does (sampling at "
        "temperature 1, no-repeat 6-grams, the last --max-prompt-tokens of each prompt); writes predictions.jsonl, "
        "scores.json and scores.md to --output. The paper suite is read from the data root (SRA_DATA_ROOT).",
        add_evaluate_arguments, "sra_distill.evaluation.evaluate",
    ),
    "spans": Command(
        "show how two tokenizers split a text and the spans SRA aligns (terminal, optional HTML page)",
        "Tokenize a text (--text, as a response) or records (--data) with both tokenizers, as training does, and "
        "show the shared spans: colours per span in the terminal (plain with --no-color or when not a terminal), "
        "an HTML page with both sides (--html), and statistics (spans per token, multi-token spans, shared "
        "vocabulary).",
        add_spans_arguments, "sra_distill.data.spans_view",
    ),
    "report": Command(
        "a markdown + HTML report of a run: settings, loss and dev curves, eval tables, data, samples",
        "Write OUTPUT_DIR/report.md and report.html from what a run left there: config.yaml, metrics.jsonl "
        "(plots), eval*/scores.json, data_report.json, and sample answers (predictions.jsonl, or a few greedy "
        "answers of final/ to Dolly dev prompts).",
        add_report_arguments, "sra_distill.evaluation.report",
    ),
    "teacher-cache": Command(
        "run the teacher once over the training data and store what the methods read (train with teacher_cache=DIR)",
        "Run the frozen teacher over the records a config trains on, paired as training pairs them, and store per "
        "record the hidden states, attention rows (and logits, when not recomputable from the head) the method(s) "
        "read, plus the teacher's LM head: safetensors shards and a manifest written last. An interrupted build "
        "resumes; `sra distill ... teacher_cache=DIR` then loads no teacher.",
        add_teacher_cache_arguments, "sra_distill.train.teacher_cache",
    ),
    "compare": Command(
        "which method for my pair: train candidates at several seeds, choose on dev, judge on test",
        "Train every candidate (a method, or any overrides) at every training seed from one base (--config and "
        "key=value: the pair, the data, the budget), by default from a teacher tuned on the training data first "
        "(the paper's protocol, cached). Score each run on dev (selection) and on test sets (judgement) with the "
        "paper's ROUGE-L, and write compare.md (mean ± std over seeds, each candidate against the dev-selected best "
        "and against SFT with a paired bootstrap interval, wall times) and compare.png to --output. Resumable; "
        "refuses to mix rows of different base settings.",
        add_compare_arguments, "sra_distill.compare",
    ),
    "vocab": Command(
        "shared vocabulary of two tokenizers (exact and normalised); build MinED's vocabulary map ahead of time",
        "Print the shared-vocabulary sizes SRA's span KL uses (exact string match, as the paper, and "
        "with word-start markers and byte tokens normalised), and with --mined-map compute and cache MinED's "
        "minimum-edit-distance vocabulary map (cached by content hash under $SRA_CACHE) so training starts at once.",
        add_vocab_arguments, "sra_distill.cli",
    ),
    "student": Command(
        "build a pretrained student: a model's body with another tokenizer's vocabulary",
        "Re-tokenise a pretrained model for another tokenizer: every decoder block is kept (or the "
        "ones --layers names), and each embedding row of the new vocabulary is the source row of the same text, "
        "or the mean of the source rows of its source tokenization (fast vocabulary transfer). The result is an "
        "ordinary Hugging Face folder; `student: from:MODEL` in a config builds the same thing automatically.",
        add_student_arguments, "sra_distill.cli",
    ),
    "doctor": Command(
        "check this installation: data root, cache, tokenizers, packaged models, library versions, device",
        "One screen on whether runs can start here: the data root (SRA_DATA_ROOT) and the folders runs "
        "read, the cache folder (SRA_CACHE) and its size, the known tokenizers and packaged models available "
        "offline, the library versions against the tested ones, and the device. Exit 0 when everything a run "
        "needs is there, 1 otherwise (the missing things are named).",
        add_doctor_arguments, "sra_distill.cli",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The `sra` parser: `sra distill` and the commands of COMMANDS."""
    parser = argparse.ArgumentParser(prog="sra",
                                     description="Cross-tokenizer knowledge distillation (SRA and baselines)")
    sub = parser.add_subparsers(dest="command", required=True)
    _distill_parser(sub)
    for name, spec in COMMANDS.items():
        _command_parser(sub, name, spec)
    return parser


def _warn_untested_versions(command: str) -> None:
    """One line on stderr when the libraries are not the tested ones (`sra doctor` lists them itself)."""
    warning = None if command == "doctor" else version_warning()
    if warning:
        print(warning, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    _warn_untested_versions(args.command)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:  # bad settings, arguments, data, files, models, tokenizers (any other error keeps its
        print(f"sra {args.command}: error: {exc}", file=sys.stderr)  # traceback: it is a bug, not a mistake)
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
