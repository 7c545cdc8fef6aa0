"""Why does plain SFT beat SRA on real weights? A study on the embedded default pair (issue 17).

Pair: SmolLM2-135M-Instruct teacher -> its own body re-tokenised for Llama-2 (`student: from:...`), the built-in
defaults of `sra config`. Three parts, each writing its own section of the report (`dev` resumes):

1. `grads`: per-term gradient norms at the student's parameters. For the first N training micro-batches, each
   term of the loss exactly as `Trainer.train_step` weights it (alpha * CE, (1 - alpha) * gamma * L_cos,
   (1 - alpha) * lambda * L_geo, (1 - alpha) * L_kl) is differentiated on its own; the table gives the norm of
   each term's gradient over the student's trainable parameters, its cosine with the CE gradient, and the norm of
   the sum (what clipping sees). Run at the untrained student and, with `--student DIR`, at a trained one.
2. `masses`: how often the paper's CoM floor max(M_k, 1e-5) shrinks a span's centre (and so its span logits).
3. `dev`: variants of the recipe trained with the same data, seed and budget as `benchmarks/quality.py`
   (24 steps x 8 x 192) and scored on Dolly **dev** (model selection, never a test set): the first
   `--eval-examples` dev records, sampling seeds 10 and 20, 64 new tokens, DSKD ROUGE-L protocol. SFT at each
   learning rate is in the table, so every SRA variant has a budget-matched plain baseline; the paired bootstrap
   over examples compares each row with the best SFT row (of training seed 42). Any of SRA (KL mean), SFT, ULD,
   MinED and the paper's SRA can be repeated at training seeds 43 and 44 (`<variant>_s43`); SRA is compared with
   every method over the seeds both have. `--against A,B` compares
   every row with those variants instead (e.g. `uld`, `mined`: the best baselines on the test sets), `--steps`
   changes the budget (its runs and record entries are kept apart), and `--section` names the report section an
   invocation owns. Each finished run, with its per-example scores, is kept in `sra_study.runs.json` beside the
   report, so a later session re-renders and compares without the run folders.

    python benchmarks/sra_study.py grads --batches 4                          # at the untrained student
    python benchmarks/sra_study.py grads --batches 2 --tag "kl mean" methods.sra.kl_normalization=mean
    python benchmarks/sra_study.py masses --batches 4
    nohup python benchmarks/sra_study.py dev > study.log 2>&1 &               # resumable; --variants a,b,c
    python benchmarks/sra_study.py dev --section 3-dev-uld --variants uld,sra_klmean --against uld
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (the run/evaluate/bootstrap machinery of the quality benchmark)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEV_SET = ("dolly-dev", "dolly/dev.jsonl")


def training_seed(name: str) -> int:
    """The training seed of a variant: its `_sNN` suffix, else the config's 42."""
    stem, _, suffix = name.rpartition("_s")
    return int(suffix) if stem and suffix.isdigit() else 42


# name -> (label, overrides). Hyper-parameters are chosen on dev only; quality.py's test sets judge once.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "untrained": ("Student before training", ()),
    "sft": ("SFT, lr 5e-5", ("method=sft",)),
    "sra": ("SRA defaults (alpha 0.5, clip 1, tau 2, lr 5e-5)", ("method=sra",)),
    "sra_alpha09": ("SRA, alpha 0.9 (distillation weight 0.1)", ("method=sra", "alpha=0.9")),
    "sra_noclip": ("SRA, no gradient clipping", ("method=sra", "max_grad_norm=0")),
    "sra_kl_alpha09": ("SRA span KL only, alpha 0.9", ("method=sra", "alpha=0.9", "methods.sra.use_cos=false",
                                                        "methods.sra.use_geo=false")),
    "sft_lr1e4": ("SFT, lr 1e-4", ("method=sft", "lr=1e-4")),
    "sra_lr1e4": ("SRA defaults, lr 1e-4", ("method=sra", "lr=1e-4")),
    "sra_alpha09_lr1e4": ("SRA, alpha 0.9, lr 1e-4", ("method=sra", "alpha=0.9", "lr=1e-4")),
    "sra_klmean": ("SRA, span KL as a mean over spans (kl_normalization=mean)",
                   ("method=sra", "methods.sra.kl_normalization=mean")),
    "sra_kltokens": ("SRA, span KL as a mean over the student tokens the spans cover (kl_normalization=tokens)",
                     ("method=sra", "methods.sra.kl_normalization=tokens")),
    "sra_klmean_lr1e4": ("SRA, KL mean over spans, lr 1e-4",
                         ("method=sra", "methods.sra.kl_normalization=mean", "lr=1e-4")),
    "sra_t1": ("SRA, tau 1", ("method=sra", "methods.sra.temperature=1.0")),
    "sra_klmean_t1": ("SRA, KL mean over spans, tau 1",
                      ("method=sra", "methods.sra.kl_normalization=mean", "methods.sra.temperature=1.0")),
    "sra_klmean_alpha03": ("SRA, KL mean over spans, alpha 0.3 (distillation weight 0.7)",
                           ("method=sra", "methods.sra.kl_normalization=mean", "alpha=0.3")),
    "sra_klmean_noclip": ("SRA, KL mean over spans, no gradient clipping",
                          ("method=sra", "methods.sra.kl_normalization=mean", "max_grad_norm=0")),
    "sra_klmean_exact_vocab": ("SRA, KL mean over spans, exact-string shared vocabulary (the paper's)",
                               ("method=sra", "methods.sra.kl_normalization=mean",
                                "methods.sra.normalize_vocab=false")),
    "uld": ("ULD, lr 5e-5", ("method=uld",)),
    "uld_lr1e4": ("ULD, lr 1e-4", ("method=uld", "lr=1e-4")),
    "mined": ("MinED, lr 5e-5", ("method=mined",)),
    "mined_lr1e4": ("MinED, lr 1e-4", ("method=mined", "lr=1e-4")),
    "sra_exact_vocab": ("SRA, exact-string shared vocabulary (the paper's)", ("method=sra", "methods.sra.normalize_vocab=false")),
}
# The same recipe at several training seeds (initialisation of the method's parts, data order, dropout):
# method -> its seed-42 variant, then `<variant>_s43`, `<variant>_s44`.
TRAINING_SEEDS = {method: (base, f"{base}_s43", f"{base}_s44")
                  for method, base in (("SRA", "sra_klmean"), ("SFT", "sft"), ("ULD", "uld"), ("MinED", "mined"),
                                       ("SRA (paper's form)", "sra"))}
VARIANTS.update({twin: (f"{VARIANTS[base][0]}, training seed {training_seed(twin)}",
                        (*VARIANTS[base][1], f"seed={training_seed(twin)}"))
                 for base, *twins in TRAINING_SEEDS.values() for twin in twins})
DEFAULT_VARIANTS = ("untrained", "sft", "sra", "sra_klmean", "sft_s43", "sra_klmean_s43", "sft_s44", "sra_klmean_s44",
                    "sft_lr1e4", "sra_klmean_lr1e4", "sra_alpha09", "sra_t1")


# ------------------------------------------------------------------------------------------------ grads

def _dot(a: list, b: list) -> float:
    # float64 accumulation per parameter tensor: a float32 sum over ~1e8 entries is off by percents.
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def _norm(a: list) -> float:
    return _dot(a, a) ** 0.5


def _cosine(a: list, b: list) -> float:
    return _dot(a, b) / max(_norm(a) * _norm(b), 1e-30)


def term_gradients(overrides: list[str], batches: int) -> list[dict]:
    """Per micro-batch: {term: (grad norm, cosine with the CE gradient)} plus the norm of the summed gradient."""
    import torch

    from sra_distill.config import load_config
    from sra_distill.train.engine import Trainer

    # The fused span KL (same values and gradients as the default reuse path, tests/test_sra_reuse_and_layers.py):
    # the reuse path adds the KL's gradient through a hook on the token logits, which would leak into the CE's.
    cfg = load_config(None, ["method=sra", "progress=false", "demo_prompt=null", "demo_eval_seeds=null",
                             "output_dir=runs/sra-study/grads", "overwrite=true",
                             "methods.sra.reuse_student_logits=false", *overrides])
    trainer = Trainer(cfg)
    try:
        params = [p for p in trainer.student.parameters() if p.requires_grad]
        sra = cfg.methods.sra
        rows = []
        for index, group in enumerate(trainer._micro_batches()):
            if index >= batches:
                break
            batch = group[0]
            out = trainer._forward(batch)
            terms = {
                "CE": cfg.alpha * out["ce"],
                "L_cos": (1 - cfg.alpha) * sra.cos_weight * out["cos"],
                "L_geo": (1 - cfg.alpha) * sra.geo_weight * out["geo"],
                "L_kl": (1 - cfg.alpha) * out["kl"],
            }
            grads = {}
            for name, value in terms.items():
                if not value.requires_grad:  # a switched-off term is a constant zero
                    grads[name] = None
                    continue
                parts = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
                grads[name] = [g if g is not None else torch.zeros_like(p) for g, p in zip(parts, params)]
            live = [g for g in grads.values() if g is not None]
            total = [sum(parts) for parts in zip(*live)]
            ce = grads["CE"]
            row = {"batch": index, "values": {k: float(v.detach()) for k, v in terms.items()}, "terms": {}}
            for name, g in grads.items():
                row["terms"][name] = (dict(norm=0.0, cos_ce=float("nan")) if g is None
                                      else dict(norm=_norm(g), cos_ce=_cosine(g, ce)))
            row["total_norm"] = _norm(total)
            row["cos_total_ce"] = _cosine(total, ce)
            rows.append(row)
            print(f"[grads] batch {index}: " + ", ".join(f"{k} {v['norm']:.2f} (cos CE {v['cos_ce']:+.2f})"
                                                        for k, v in row["terms"].items())
                  + f"; total {row['total_norm']:.2f}", flush=True)
            del grads, total, out
        return rows
    finally:
        trainer.close()


def grads_section(tag: str, rows: list[dict], command: str) -> str:
    names = list(rows[0]["terms"])
    lines = [f"### Gradient norms per loss term: {tag}", "", f"Command: `{command}`", "",
             "Each term weighted as in the training loss; norm over the student's trainable parameters; "
             "mean (min-max) over the micro-batches.", "",
             "| term | loss value | gradient norm | cosine with the CE gradient |", "|---|---|---|---|"]

    def stat(values: list[float], fmt: str) -> str:
        return f"{np.mean(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"

    for name in names:
        norms = [r["terms"][name]["norm"] for r in rows]
        coss = [r["terms"][name]["cos_ce"] for r in rows]
        values = [r["values"][name] for r in rows]
        cos_cell = "-" if name == "CE" or np.isnan(coss).all() else stat(coss, "+.2f")
        lines.append(f"| {name} | {stat(values, '.3f')} | {stat(norms, '.2f')} | {cos_cell} |")
    lines.append(f"| sum (what clipping sees) | - | {stat([r['total_norm'] for r in rows], '.2f')} | "
                 f"{stat([r['cos_total_ce'] for r in rows], '+.2f')} |")
    return "\n".join(lines) + "\n"


def span_mass_stats(overrides: list[str], batches: int) -> dict:
    """How often the paper's CoM floor max(M_k, 1e-5) shrinks a span's centre, per side: C_k = sum m_t h_t /
    max(M_k, 1e-5) is M_k / 1e-5 times the span's weighted mean when M_k < 1e-5, and its span logits shrink alike
    (toward a uniform distribution at the KL's temperature)."""
    import torch

    from sra_distill.config import load_config
    from sra_distill.losses.sra import MASS_FLOOR, span_centers, token_mass
    from sra_distill.models.capture import capture
    from sra_distill.train.engine import Trainer

    cfg = load_config(None, ["method=sra", "progress=false", "demo_prompt=null", "demo_eval_seeds=null",
                             "output_dir=runs/sra-study/masses", "overwrite=true", *overrides])
    trainer = Trainer(cfg)
    needs = trainer.needs
    counts = dict(spans=0, teacher_small=0, student_small=0, either_small=0, ratio_over_10=0)
    try:
        with torch.no_grad():
            for index, group in enumerate(trainer._micro_batches()):
                if index >= batches:
                    break
                batch = group[0]
                masses, valid_sides = [], []
                for model, side, hidden_layers, attention_layers in (
                    (trainer.teacher, batch.teacher, needs.teacher_hidden_layers, needs.teacher_attention_layers),
                    (trainer.student, batch.student, needs.student_hidden_layers, needs.student_attention_layers),
                ):
                    view = capture(model, side.input_ids, side.attention_mask, hidden_layers=hidden_layers,
                                   attention_layers=attention_layers, logits=False)
                    mass = token_mass(view.attention_row[max(view.attention_row)], side.attention_mask)
                    hidden = view.hidden[max(view.hidden)]
                    _, span_mass, valid = span_centers(hidden, mass, side.span_ids, batch.num_spans)
                    masses.append(span_mass)
                    valid_sides.append(valid)
                valid = valid_sides[0] & valid_sides[1]
                teacher_mass, student_mass = masses[0][valid], masses[1][valid]
                scale_t = (teacher_mass / MASS_FLOOR).clamp(max=1)
                scale_s = (student_mass / MASS_FLOOR).clamp(max=1)
                counts["spans"] += int(valid.sum())
                counts["teacher_small"] += int((teacher_mass < MASS_FLOOR).sum())
                counts["student_small"] += int((student_mass < MASS_FLOOR).sum())
                counts["either_small"] += int(((teacher_mass < MASS_FLOOR) | (student_mass < MASS_FLOOR)).sum())
                ratio = torch.maximum(scale_t / scale_s.clamp_min(1e-30), scale_s / scale_t.clamp_min(1e-30))
                counts["ratio_over_10"] += int((ratio > 10).sum())
    finally:
        trainer.close()
    return counts


def masses_section(counts: dict, command: str) -> str:
    n = max(1, counts["spans"])
    share = {k: 100.0 * v / n for k, v in counts.items()}
    return "\n".join([
        "### How often the CoM floor shrinks a span", "", f"Command: `{command}`", "",
        "C_k = sum m_t h_t / max(M_k, 1e-5) (the paper's form) equals the span's attention-weighted mean times "
        "M_k / 1e-5 when the span's mass M_k is below 1e-5, so its span logits shrink toward zero alike.", "",
        "| aligned spans | teacher M_k < 1e-5 | student M_k < 1e-5 | either side | sides' shrink factors differ > 10x |",
        "|---|---|---|---|---|",
        f"| {counts['spans']} | {share['teacher_small']:.1f}% | {share['student_small']:.1f}% | "
        f"{share['either_small']:.1f}% | {share['ratio_over_10']:.1f}% |", ""])


# ------------------------------------------------------------------------------------------------ dev

def dev_budget(eval_examples: int, steps: int = quality.FULL_BUDGET["steps"]) -> quality.Budget:
    values = dict(quality.FULL_BUDGET, eval_examples=eval_examples, seeds=(10, 20), eval_sets=(DEV_SET[0],),
                  steps=steps)
    return quality.Budget(**values)


def dev_section(budget: quality.Budget, root: Path, names: list[str], results: dict[str, dict],
                failures: dict[str, str], command: str, against: tuple[str, ...] = ()) -> str:
    """The dev table; one last column per reference row: each variant in `against`, or (when empty) the best
    seed-42 SFT row."""
    base = results.get("untrained")
    seed_twins = {n for group in TRAINING_SEEDS.values() for n in group[1:]}
    if not against:
        sft_rows = [n for n in names if n.startswith("sft") and n in results and n not in seed_twins]
        best_sft = max(sft_rows, key=lambda n: results[n]["rouge_l_mean"]) if sft_rows else None
        references = [(best_sft, "best SFT", f"the best SFT row ({best_sft or 'none yet'})")]
    else:
        references = [(n if n in results else None, n, f"{n} ({VARIANTS[n][0]})") for n in against]
    lines = [f"### Recipe variants on Dolly dev, {budget.steps} steps", "", f"Command: `{command}`", "",
             f"Budget of every row: {budget.steps} steps x batch {budget.batch_size} x max_length "
             f"{budget.max_length}, Dolly train, training seed 42 unless the row says otherwise. Dev score: first {budget.eval_examples} records "
             f"of `{DEV_SET[1]}`, sampling seeds {', '.join(map(str, budget.seeds))}, {budget.max_new_tokens} new "
             "tokens; mean ± population std over seeds. Last column(s): paired bootstrap over examples (each "
             f"example's ROUGE-L averaged over seeds) against {' and '.join(r[2] for r in references)}.", "",
             "| variant | dev ROUGE-L | gain over untrained | final train CE | train wall | "
             + " | ".join(f"vs {r[1]} (95% interval)" for r in references) + " |",
             "|---|---|---|---|---|" + "---|" * len(references)]
    reference_scores = [(n, _dev_scores(root, n, results) if n else None) for n, _, _ in references]
    for name in names:
        label = VARIANTS[name][0]
        r = results.get(name)
        if r is None:
            lines.append(f"| {label} | {'failed' if name in failures else 'pending'} | | | |" + " |" * len(references))
            continue
        v = r["sets"][DEV_SET[0]]
        gain = f"{r['rouge_l_mean'] - base['rouge_l_mean']:+.2f}" if base and name != "untrained" else "-"
        ce = f"{r['train_ce']:.3f}" if "train_ce" in r else "-"
        train = quality._minutes(r["train_s"]) if r.get("train_s") else "-"
        scores = _dev_scores(root, name, results)
        cells = []
        for reference, ref_scores in reference_scores:
            if ref_scores is None or scores is None or name == reference:
                cells.append("-")
                continue
            diff, low, high = quality.paired_bootstrap(scores, ref_scores)
            cells.append(f"{diff:+.2f} [{low:+.2f}, {high:+.2f}]")
        lines.append(f"| {label} | {v['mean']:.2f} ± {v['std']:.2f} | {gain} | {ce} | {train} | "
                     + " | ".join(cells) + " |")
    lines += training_seed_lines(root, results)
    for name, message in failures.items():
        lines += ["", f"**{name} failed:**", "", "```", message[-2000:], "```"]
    return "\n".join(lines) + "\n"


def _dev_scores(root: Path, name: str, results: dict[str, dict]) -> np.ndarray | None:
    """Per-example dev scores of a finished variant (kept in its result, else read from its run folder)."""
    scores = quality.example_scores(results[name], root / name)
    return None if scores is None else scores[DEV_SET[0]]


def training_seed_lines(root: Path, results: dict[str, dict]) -> list[str]:
    """SRA (KL mean) against every other method run at two or more of the same training seeds: mean ± std over
    training seeds, and a paired bootstrap over examples of each example's score averaged over training and
    sampling seeds."""
    done = {method: [n for n in group if n in results] for method, group in TRAINING_SEEDS.items()}
    compared = {}
    for method, group in TRAINING_SEEDS.items():
        pairs = [(a, b) for a, b in zip(TRAINING_SEEDS["SRA"], group) if a in results and b in results]
        if method != "SRA" and len(pairs) >= 2:
            compared[method] = pairs
    if not compared:
        return []
    lines = ["", "**Training seeds.** Each method at every training seed it was run with; SRA below is the span KL "
             "as a mean over spans.", "", "| method | dev ROUGE-L per training seed | mean ± std over training seeds |",
             "|---|---|---|"]
    for method, names in done.items():
        if len(names) < 2:
            continue
        means = [results[n]["rouge_l_mean"] for n in names]
        lines.append(f"| {VARIANTS[names[0]][0]} (seeds {', '.join(str(training_seed(n)) for n in names)}) | "
                     f"{', '.join(f'{m:.2f}' for m in means)} | {np.mean(means):.2f} ± {np.std(means):.2f} |")
    lines.append("")
    for method, pairs in compared.items():
        seeds = ", ".join(str(training_seed(sra)) for sra, _ in pairs)
        kept = [[_dev_scores(root, name, results) for name in pair] for pair in pairs]
        if any(scores is None for pair in kept for scores in pair):
            lines.append(f"- SRA - {method} over training seeds {seeds}: no paired bootstrap, some of these "
                         "runs' per-example scores were not kept.")
            continue
        sra, other = (np.mean([pair[i] for pair in kept], axis=0) for i in (0, 1))
        diff, low, high = quality.paired_bootstrap(sra, other)
        lines.append(f"- Paired bootstrap over examples, scores averaged over the {len(pairs)} training seeds "
                     f"({seeds}): SRA - {method} = {diff:+.2f}, 95% interval [{low:+.2f}, {high:+.2f}].")
    return lines


def write_report(sections: dict[str, str], path: Path) -> None:
    header = ("# SRA against SFT on real weights: the study of issue 17\n\n"
              "Written by `benchmarks/sra_study.py` (see its docstring). Pair: the built-in defaults "
              "(SmolLM2-135M-Instruct teacher -> its body with the Llama-2 tokenizer, full fine-tuning). "
              "The train wall column is each run's own time on 2 CPU cores that were sometimes shared by two "
              "runs at once: it is not a speed comparison between rows.\n\n")
    path.write_text(header + "\n".join(sections[k] for k in sorted(sections)))


def save_section(state: Path, output: Path, key: str, text: str) -> None:
    """Read, update, write: parts may run at the same time, each owning its own sections."""
    with quality.exclusive(state):
        sections = json.loads(state.read_text()) if state.exists() else {}
        sections[key] = text
        state.write_text(json.dumps(sections, indent=1))
        write_report(sections, output)


def shown_command(argv: list[str]) -> str:
    """The command a report prints: without --output and --work-dir, which say where files go on one machine
    (absolute paths there) and change no figure."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--output", "--work-dir"):
            skip = True
        elif not arg.startswith(("--output=", "--work-dir=")):
            kept.append(arg)
    return "python benchmarks/sra_study.py " + shlex.join(kept)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="part", required=True)
    g = sub.add_parser("grads", help="per-term gradient norms")
    g.add_argument("--batches", type=int, default=4)
    g.add_argument("--student", help="a trained student folder (default: the untrained from: student)")
    g.add_argument("--tag", default="untrained student")
    g.add_argument("overrides", nargs="*", help="config overrides key=value")
    m = sub.add_parser("masses", help="how often the CoM floor shrinks a span's centre")
    m.add_argument("--batches", type=int, default=4)
    m.add_argument("overrides", nargs="*", help="config overrides key=value")
    d = sub.add_parser("dev", help="recipe variants scored on Dolly dev")
    d.add_argument("--variants", help=f"comma-separated (default {','.join(DEFAULT_VARIANTS)}); all: "
                                      f"{', '.join(VARIANTS)}")
    d.add_argument("--eval-examples", type=int, default=50)
    d.add_argument("--work-dir", type=Path, default=REPO / "runs" / "sra-study")
    d.add_argument("--steps", type=int, default=quality.FULL_BUDGET["steps"],
                   help="optimiser steps per run (default: the quality benchmark's budget)")
    d.add_argument("--against", help="comma-separated variants every row is compared with (default: the best "
                                      "seed-42 SFT row)")
    d.add_argument("--section", default="2-dev", help="report section this invocation owns (sorted by key)")
    p.add_argument("--output", type=Path, default=RESULTS / "sra_study.md")
    args = p.parse_args(argv)
    state = args.output.with_suffix(".sections.json")  # each part's rendered section, so parts run separately
    command = shown_command(argv if argv is not None else sys.argv[1:])

    if args.part == "grads":
        overrides = list(args.overrides) + ([f"student={args.student}"] if args.student else [])
        rows = term_gradients(overrides, args.batches)
        save_section(state, args.output, f"1-grads-{args.tag}", grads_section(args.tag, rows, command))
    elif args.part == "masses":
        save_section(state, args.output, "1-masses",
                     masses_section(span_mass_stats(list(args.overrides), args.batches), command))
    else:
        quality.EVAL_SETS.setdefault(*DEV_SET)
        names = [n.strip() for n in (args.variants.split(",") if args.variants else DEFAULT_VARIANTS) if n.strip()]
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise SystemExit(f"sra_study.py: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
        if args.steps < 1:
            raise SystemExit(f"sra_study.py: --steps must be >= 1, got {args.steps}")
        against = tuple(n.strip() for n in (args.against or "").split(",") if n.strip())
        if any(n not in names for n in against):
            raise SystemExit(f"sra_study.py: --against {args.against} names a variant not in --variants")
        budget = dev_budget(args.eval_examples, args.steps)
        root = args.work_dir / f"{budget.tag()}"
        record = quality.record_path(args.output)  # finished results with per-example scores, committed
        kept = quality.load_record(record, budget)
        # every finished variant first, so each section written along the way shows them all
        results = quality.finished_results(names, root, budget, kept, "study")
        failures: dict[str, str] = {}
        for name in names:
            label, overrides = VARIANTS[name]
            run = quality.Run(name, label, overrides, trains=name != "untrained")
            done = root / name / f"result-{budget.eval_tag()}.json"
            if name not in results:
                print(f"[study] {name}: running ({root / name})", flush=True)
                started = time.perf_counter()
                try:
                    results[name] = quality.run_one(run, budget, root / name)
                except RuntimeError as err:
                    failures[name] = str(err)
                    print(f"[study] {err}", file=sys.stderr, flush=True)
                else:
                    done.write_text(json.dumps(results[name], indent=1) + "\n")
                    print(f"[study] {name}: dev ROUGE-L {results[name]['rouge_l_mean']:.2f} "
                          f"({time.perf_counter() - started:.0f} s)", flush=True)
            quality.save_record(record, budget, {k: v for k, v in results.items() if k == name})
            save_section(state, args.output, args.section,
                         dev_section(budget, root, names, results, failures, command, against))
        if failures:
            return 1
    print(f"[study] wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
