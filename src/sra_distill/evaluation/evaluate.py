"""Evaluation: ROUGE-L of sampled generations, the protocol of the DSKD/MiniLLM lineage that the SRA paper follows.
Generation itself (prompt encoding, left padding, pinned settings) is `generate.py`; this module scores it and runs
`sra evaluate`.

Protocol (SRA paper section 4; DSKD, Zhang et al. 2024; MiniLLM, Gu et al. 2024):

* prompt = the record's Alpaca prompt (ends with "### Response:\\n"), truncated to `max_prompt_tokens` = 256 tokens.
  We keep the LAST 256 tokens (plus any leading special tokens such as BOS) so that the instruction tail and
  "### Response:" survive; cutting the end would make the model continue the input instead of answering.
* batches are LEFT-padded so every prompt ends at the same position and generation continues right after it.
* `max_new_tokens` = 256, sampling with temperature 1.0, top_p 1.0, top_k 0 (no top-k), no_repeat_ngram_size 6;
  one run per seed (10, 20, 30, 40, 50), the seeds of torch/numpy/random set before each (set, seed) run.
  Greedy decoding (`do_sample=False`, same no-repeat rule) is an option.
* response = decoded generated tokens after the prompt, special tokens dropped, stripped.
* score of one example = max over its references of ROUGE-L F1 (`rouge_score`, `use_stemmer=True`); an empty
  response scores 0 and counts. Score of a set for a seed = 100 * mean over examples.
* reported per set: mean and POPULATION standard deviation (numpy's default, ddof=0; defined for a single seed)
  over seeds; overall = average of the set means.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from rouge_score import rouge_scorer
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sra_distill.data.records import Record, load_records
from sra_distill.errors import ConfigError, DataError, NotFoundError
from sra_distill.evaluation.generate import (
    NEUTRAL_SAMPLING,
    NO_REPEAT_NGRAM_SIZE,
    context_window,
    fit_to_context,
    generate,
)
from sra_distill.evaluation.suites import DEFAULT_SEEDS, SUITES
from sra_distill.models.load import load_model
from sra_distill.paths import data_root, data_root_note, resolve_data_path
from sra_distill.quiet import quiet_libraries
from sra_distill.validation import set_hub_offline

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """ROUGE-L F1 in [0, 1] of `prediction`, the best over `references` (a string or a non-empty list)."""
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("rouge_l: references is empty; each example needs at least one reference")
    if not all(isinstance(r, str) for r in refs):
        raise TypeError(f"rouge_l: references must be strings, got {[type(r).__name__ for r in refs]}")
    return max(_SCORER.score(ref, prediction)["rougeL"].fmeasure for ref in refs)


def _prompts_and_references(records_or_prompts, references) -> tuple[list[str], list[list[str]]]:
    items = list(records_or_prompts)
    if references is None:
        return [r.prompt for r in items], [list(r.references) for r in items]
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if len(refs) != len(items):
        raise ValueError(f"{len(items)} prompts but {len(refs)} references")
    return [str(p) for p in items], refs


def dev_rouge(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records_or_prompts: Iterable,
    references: Sequence[str | Sequence[str]] | None = None,
    *,
    seed: int = 10,
    max_examples: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    do_sample: bool = True,
) -> float:
    """Mean ROUGE-L x100 of one generation run, for model selection during training (Dolly dev).

    `records_or_prompts`: records with `.prompt` and `.references` (then `references` is None), or prompt strings
    with `references` (one string or list of strings per prompt).
    """
    prompts, refs = _prompts_and_references(records_or_prompts, references)
    if max_examples is not None:
        prompts, refs = prompts[:max_examples], refs[:max_examples]
    if not prompts:
        raise ValueError("dev_rouge: no examples to evaluate")
    preds = generate(
        model, tokenizer, prompts, seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens, do_sample=do_sample
    )
    return 100.0 * float(np.mean([rouge_l(p, r) for p, r in zip(preds, refs)]))


@dataclass
class SetScores:
    """One evaluation set's ROUGE-L x100: one value per seed, their mean and population std."""

    path: str
    n_examples: int
    seeds: list[int]
    per_seed: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_seed))

    @property
    def std(self) -> float:
        return float(np.std(self.per_seed))  # population std (ddof=0), see module docstring

    def as_dict(self) -> dict:
        return dict(
            path=self.path, n_examples=self.n_examples, seeds=self.seeds, per_seed=self.per_seed,
            mean=self.mean, std=self.std,
        )


def load_eval_set(name: str, source: str | Path | Sequence[Record], max_examples: int | None = None) -> list[Record]:
    """The first `max_examples` records of an evaluation set given as a jsonl path (or already loaded records),
    checked to carry a rendered prompt."""
    if isinstance(source, (str, Path)):
        records = load_records(source, limit=max_examples)
    else:
        records = list(source)[:max_examples]
    if not records:
        raise DataError(f"evaluation set {name!r} ({source}) has no records")
    chat = [r for r in records if r.prompt is None]
    if chat:
        raise DataError(
            f"evaluation set {name!r}: {chat[0].source} line {chat[0].line} is a chat record without a rendered "
            f"'prompt'; evaluation needs prompt records (DSKD/MiniLLM or Alpaca format)"
        )
    return records


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sets: dict[str, str | Path | Sequence[Record]],
    seeds: Sequence[int] = DEFAULT_SEEDS,
    max_examples: int | None = None,
    output_dir: str | Path | None = None,
    batch_size: int = 8,
    progress: bool = True,
    max_prompt_tokens: int = 256,
    max_new_tokens: int = 256,
    do_sample: bool = True,
) -> dict:
    """Generate for every set (a jsonl path or loaded records) and seed, score, and (if `output_dir`) write
    predictions.jsonl, scores.json and scores.md.

    Returns the scores.json content: `{"protocol": {...}, "sets": {name: SetScores.as_dict()}, "average": float}`.
    """
    if not sets:
        raise ValueError("evaluate_model: no evaluation sets given")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("evaluate_model: no seeds given")
    loaded = {name: load_eval_set(name, source, max_examples) for name, source in sets.items()}
    window = context_window(model)
    fitted_prompt, fitted_new = fit_to_context(window, max_prompt_tokens, max_new_tokens)
    if (fitted_prompt, fitted_new) != (max_prompt_tokens, max_new_tokens):
        print(f"note: the model has {window} positions; prompt + new tokens ({max_prompt_tokens} + {max_new_tokens}) "
              f"are cut to {fitted_prompt} + {fitted_new} to fit (recorded in scores.json)", file=sys.stderr)
    out_dir = Path(output_dir) if output_dir is not None else None
    pred_file = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        pred_file = open(out_dir / "predictions.jsonl", "w", encoding="utf-8")
    results: dict[str, SetScores] = {}
    try:
        for name, records in loaded.items():
            prompts = [r.prompt for r in records]
            refs = [list(r.references) for r in records]
            per_seed = []
            with tqdm(total=len(prompts) * len(seeds), desc=name, unit="ex", disable=not progress) as bar:
                for seed in seeds:
                    done: dict[int, str] = {}
                    try:
                        preds = generate(
                            model, tokenizer, prompts, seed=seed, batch_size=batch_size,
                            max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
                            do_sample=do_sample, on_batch=bar.update,
                            on_results=lambda indices, texts: done.update(zip(indices, texts)),
                        )
                    except KeyboardInterrupt:  # keep what this seed finished (earlier seeds are written already)
                        if pred_file is not None:
                            for i, pred in sorted(done.items()):
                                row = dict(set=name, seed=seed, index=i, prompt=prompts[i], prediction=pred,
                                           references=refs[i], rougeL=rouge_l(pred, refs[i]))
                                pred_file.write(json.dumps(row, ensure_ascii=False) + "\n")
                        raise
                    scores = [rouge_l(p, r) for p, r in zip(preds, refs)]
                    per_seed.append(100.0 * float(np.mean(scores)))
                    bar.set_postfix(rougeL=f"{per_seed[-1]:.2f}")
                    if pred_file is not None:
                        for i, (prompt, pred, ref, score) in enumerate(zip(prompts, preds, refs, scores)):
                            row = dict(set=name, seed=seed, index=i, prompt=prompt, prediction=pred,
                                       references=ref, rougeL=score)
                            pred_file.write(json.dumps(row, ensure_ascii=False) + "\n")
                        pred_file.flush()
            source = sets[name] if isinstance(sets[name], (str, Path)) else records[0].source
            results[name] = SetScores(str(source), len(records), seeds, per_seed)
    finally:
        if pred_file is not None:
            pred_file.close()
    report = dict(
        model=str(model.name_or_path),
        protocol=dict(
            seeds=seeds, max_examples=max_examples, max_prompt_tokens=max_prompt_tokens,
            max_new_tokens=max_new_tokens, do_sample=do_sample,
            **({} if window is None else dict(context_window=window)),
            **({"fitted_to_context": dict(max_prompt_tokens=fitted_prompt, max_new_tokens=fitted_new)}
               if (fitted_prompt, fitted_new) != (max_prompt_tokens, max_new_tokens) else {}),
            **({k: NEUTRAL_SAMPLING[k] for k in ("temperature", "top_p", "top_k")} if do_sample else {}),
            no_repeat_ngram_size=NO_REPEAT_NGRAM_SIZE,
            metric="rougeL F1 x100, stemmed, max over references",
            std="population",
        ),
        sets={name: s.as_dict() for name, s in results.items()},
        average=float(np.mean([s.mean for s in results.values()])),
    )
    if out_dir is not None:
        (out_dir / "scores.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (out_dir / "scores.md").write_text(scores_markdown(report), encoding="utf-8")
    return report


def scores_markdown(report: dict) -> str:
    """A markdown table: one row per set (per-seed scores, mean, std), then the average of set means."""
    seeds = report["protocol"]["seeds"]
    head = ["set", "n"] + [f"seed {s}" for s in seeds] + ["mean", "std"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in report["sets"].items():
        per_seed = [f"{v:.2f}" for v in s["per_seed"]]
        cells = [name, str(s["n_examples"]), *per_seed, f"{s['mean']:.2f}", f"{s['std']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| **average** | " + " | " * len(seeds) + f" | **{report['average']:.2f}** | |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- CLI: sra evaluate

_GENERIC_STEMS = {"valid", "test", "dev", "train", "eval", "data"}


def _set_name(path: Path) -> str:
    """`dolly/valid.jsonl` -> dolly, `sinst/11_/valid.jsonl` -> sinst (folders not starting with a letter are
    subset markers), `my_eval.jsonl` -> my_eval."""
    if path.stem not in _GENERIC_STEMS:
        return path.stem
    for folder in path.parent.parts[::-1]:
        if folder[:1].isalpha():
            return folder
    return path.stem


def parse_eval_sets(data: Sequence[str] | None, suites: Sequence[str] | None) -> dict[str, Path]:
    """Set name -> file from `--suite` names and `--data` entries (`FILE` or `NAME=FILE`, relative to the data root
    when not found as given). Neither given: the paper suite."""
    sets: dict[str, Path] = {}
    if not data and not suites:
        suites = ["paper"]
    for suite in suites or []:
        if suite not in SUITES:
            raise ConfigError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
        sets.update({name: data_root() / rel for name, rel in SUITES[suite].items()})
    for entry in data or []:
        name, sep, file = entry.partition("=")
        if not sep or Path(entry).expanduser().exists():
            name, file = "", entry
        path = resolve_data_path(file)
        name = name or _set_name(path)
        if name in sets and sets[name] != path:
            raise ConfigError(f"two evaluation sets are named {name!r} ({sets[name]}, {path}); use --data NAME=FILE")
        sets[name] = path
    missing = [f"{name}: {p}" for name, p in sets.items() if not p.is_file()]
    if missing:
        raise NotFoundError("evaluation file(s) not found: " + "; ".join(missing) + f" ({data_root_note()})")
    return sets


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigError("--seeds is empty")
    return seeds


def refuse_used_output(output: Path, model: str) -> None:
    """`--output` must not hold another model's scores: writing there would silently replace them."""
    scores = output / "scores.json"
    if not scores.is_file():
        return
    try:
        earlier = str(json.loads(scores.read_text(encoding="utf-8")).get("model", ""))
    except (json.JSONDecodeError, AttributeError):
        earlier = "an unreadable scores.json"
    same = earlier == model or (earlier and Path(earlier).resolve() == Path(model).resolve())
    if not same:
        raise ConfigError(f"--output {output}: holds the scores of another model ({earlier}); name another folder, "
                          f"or add --overwrite to replace them")


def run_evaluate(args: argparse.Namespace) -> int:
    """`sra evaluate` (its options: `cli.add_evaluate_arguments`); a bad argument, file or model raises a `UserError`,
    which the CLI prints as one line (exit 2)."""
    seeds = parse_seeds(args.seeds)
    if args.max_examples is not None and args.max_examples < 1:
        raise ConfigError(f"--max-examples must be >= 1, got {args.max_examples}")
    for option in ("batch_size", "max_prompt_tokens", "max_new_tokens"):
        if getattr(args, option) < 1:  # argparse's namespace: the option's dest
            raise ConfigError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    # Records are read (and validated) before the model loads, so bad data fails fast.
    sets = {name: load_eval_set(name, path, args.max_examples)
            for name, path in parse_eval_sets(args.data, args.suite).items()}
    quiet_libraries(progress=not args.no_progress)  # --no-progress also silences transformers' loading bars
    if not args.allow_download:
        set_hub_offline()  # a model that is not cached fails at once instead of retrying HTTP requests
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=device,
                                  allow_download=args.allow_download)
    if not args.overwrite:
        refuse_used_output(Path(args.output), str(model.name_or_path))
    try:
        report = evaluate_model(
            model, tokenizer, sets, seeds, max_examples=args.max_examples, output_dir=args.output,
            batch_size=args.batch_size, progress=not args.no_progress, max_prompt_tokens=args.max_prompt_tokens,
            max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
        )
    except KeyboardInterrupt:
        predictions = Path(args.output) / "predictions.jsonl"
        kept = sum(1 for _ in predictions.open(encoding="utf-8")) if predictions.is_file() else 0
        print(f"\nsra evaluate: interrupted; the {kept} predictions finished so far are kept in {predictions} "
              f"(no scores written)", file=sys.stderr)
        return 130
    print(scores_markdown(report), end="")
    print(f"wrote {Path(args.output) / 'scores.json'}")
    return 0
