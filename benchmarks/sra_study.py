"""Why does plain SFT beat SRA on real weights? A study on the embedded default pair (issue 17).

Pair: SmolLM2-135M-Instruct teacher -> its own body re-tokenised for Llama-2 (`student: from:...`), the built-in
defaults of `sra config`. Three parts, each writing its own section of the report (`dev` resumes):

1. `grads`: per-term gradient norms at the student's parameters. For the first N training micro-batches, each
   term of the loss exactly as `Trainer.train_step` weights it (alpha * CE, (1 - alpha) * gamma * L_cos,
   (1 - alpha) * lambda * L_geo, (1 - alpha) * L_kl) is differentiated on its own; the table gives the norm of
   each term's gradient over the student's trainable parameters, its cosine with the CE gradient, and the norm of
   the sum (what clipping sees). Run at the untrained student and, with `--student DIR`, at a trained one.
2. `masses`: how often the paper's CoM floor max(M_k, 1e-5) shrinks a span's centre (and so its span logits).
3. `dev`: variants of the recipe compared by `sra compare` (src/sra_distill/compare.py) with the budget
   of `benchmarks/quality.py` (24 steps x 8 x 192; `--steps` changes it): selected on Dolly dev, judged on the
   test sets, each against the dev-selected best and SFT by paired bootstrap, at the training seeds `--seeds`
   gives (any other option goes to `sra compare`). Its small files go to
   `benchmarks/results/sra_study_dev_<teacher>-s<steps>/`, the run folders under --work-dir. (The dev tables of
   issue 17 in `sra_study.md` and `sra_study.runs.json` were written by this part's earlier, dev-only form.)

    python benchmarks/sra_study.py grads --batches 4                          # at the untrained student
    python benchmarks/sra_study.py grads --batches 2 --tag "kl mean" methods.sra.kl_normalization=mean
    python benchmarks/sra_study.py masses --batches 4
    nohup python benchmarks/sra_study.py dev > study.log 2>&1 &               # resumable; --variants a,b,c
    python benchmarks/sra_study.py dev --variants sft,sra_klmean,uld --seeds 42,43,44 --teacher raw
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (its budget)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


# name -> overrides. Hyper-parameters are chosen on dev; `sra compare` judges the chosen ones on the test sets.
VARIANTS: dict[str, tuple[str, ...]] = {
    "sft": ("method=sft",),
    "sra": ("method=sra",),
    "sra_alpha09": ("method=sra", "alpha=0.9"),
    "sra_noclip": ("method=sra", "max_grad_norm=0"),
    "sra_kl_alpha09": ("method=sra", "alpha=0.9", "methods.sra.use_cos=false", "methods.sra.use_geo=false"),
    "sft_lr1e4": ("method=sft", "lr=1e-4"),
    "sra_lr1e4": ("method=sra", "lr=1e-4"),
    "sra_alpha09_lr1e4": ("method=sra", "alpha=0.9", "lr=1e-4"),
    "sra_klmean": ("method=sra", "methods.sra.kl_normalization=mean"),
    "sra_kltokens": ("method=sra", "methods.sra.kl_normalization=tokens"),
    "sra_klmean_lr1e4": ("method=sra", "methods.sra.kl_normalization=mean", "lr=1e-4"),
    "sra_t1": ("method=sra", "methods.sra.temperature=1.0"),
    "sra_klmean_t1": ("method=sra", "methods.sra.kl_normalization=mean", "methods.sra.temperature=1.0"),
    "sra_klmean_alpha03": ("method=sra", "methods.sra.kl_normalization=mean", "alpha=0.3"),
    "sra_klmean_noclip": ("method=sra", "methods.sra.kl_normalization=mean", "max_grad_norm=0"),
    "sra_klmean_exact_vocab": ("method=sra", "methods.sra.kl_normalization=mean", "methods.sra.normalize_vocab=false"),
    "uld": ("method=uld",),
    "uld_lr1e4": ("method=uld", "lr=1e-4"),
    "mined": ("method=mined",),
    "mined_lr1e4": ("method=mined", "lr=1e-4"),
    "sra_exact_vocab": ("method=sra", "methods.sra.normalize_vocab=false"),
}
DEFAULT_VARIANTS = ("sft", "sra", "sra_klmean", "sft_lr1e4", "sra_klmean_lr1e4", "sra_alpha09", "sra_t1")


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

def dev_argv(args: argparse.Namespace, rest: list[str]) -> list[str]:
    """The `sra compare` command line of the `dev` part: the variants as candidates, the quality benchmark's budget
    (`--steps` changes it), the run folders under --work-dir, the small files beside the report."""
    candidates = quality.candidate_options(VARIANTS, args.variants, DEFAULT_VARIANTS, "sra_study.py")
    quality.check_steps(args.steps, "sra_study.py")
    tag = f"sra_study_dev_{args.teacher}-s{args.steps}"
    budget = dict(quality.BUDGET, max_steps=args.steps)
    return ["compare", *candidates, "--teacher", args.teacher,
            "--output", str(args.output.parent / tag), "--runs-dir", str(args.work_dir / tag), "--no-progress",
            *rest, *(f"{k}={v}" for k, v in budget.items())]


def write_report(sections: dict[str, str], path: Path) -> None:
    header = ("# SRA against SFT on real weights: the study of issue 17\n\n"
              "Written by `benchmarks/sra_study.py` (see its docstring). Pair: the built-in defaults "
              "(SmolLM2-135M-Instruct teacher -> its body with the Llama-2 tokenizer, full fine-tuning). "
              "The train wall column is each run's own time on 2 CPU cores that were sometimes shared by two "
              "runs at once: it is not a speed comparison between rows.\n\n")
    path.write_text(header + "\n".join(sections[k] for k in sorted(sections)))


def save_section(state: Path, output: Path, key: str, text: str) -> None:
    """Read, update, write: parts may run at the same time, each owning its own sections."""
    state.parent.mkdir(parents=True, exist_ok=True)
    with open(state.with_name(state.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
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


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The arguments, and the options the `dev` part passes on to `sra compare`."""
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
    d = sub.add_parser("dev", help="recipe variants compared by `sra compare` (other options go to it)")
    d.add_argument("--variants", help=f"comma-separated (default {','.join(DEFAULT_VARIANTS)}); all: "
                                      f"{', '.join(VARIANTS)}")
    d.add_argument("--work-dir", type=Path, default=REPO / "runs" / "sra-study")
    d.add_argument("--steps", type=int, default=quality.BUDGET["max_steps"],
                   help="optimiser steps per run (default: the quality benchmark's budget)")
    d.add_argument("--teacher", choices=("tuned", "raw"), default="tuned")
    p.add_argument("--output", type=Path, default=RESULTS / "sra_study.md")
    args, rest = p.parse_known_args(argv)
    if rest and args.part != "dev":
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    return args, rest


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(argv)
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
        sys.path.insert(0, str(REPO / "src"))  # the package from this checkout, installed or not
        from sra_distill.cli import main as sra

        return sra(dev_argv(args, rest))
    print(f"[study] wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
