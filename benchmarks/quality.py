"""Quality benchmark: every cross-tokenizer method, SFT and the SRA ablations of the paper on one budget.

Pair: the embedded default (`sra config`): SmolLM2-135M-Instruct teacher -> its own body re-tokenised for Llama-2
(`student: from:smollm2-135m-instruct`, ~125M parameters, full depth, full fine-tuning), Dolly train. Every run
has the same steps, batch, sequence length, training seed and data; only `method=` (or, for the ablations,
`methods.sra.*` switches) changes. Each trained student is scored on the first N examples of the Dolly and
Self-Instruct test sets with the DSKD/MiniLLM ROUGE-L protocol of `sra_distill.evaluation.evaluate` (sampling at temperature
1, no-repeat-ngram 6, ROUGE-L F1 x100 max over references, mean +- population std over sampling seeds), REDUCED
to fit 2 CPU cores: N = 100 examples instead of all, 3 seeds instead of 5, 64 new tokens instead of 256, float32.
The teacher and the student before training are evaluated the same way as reference rows.

SRA ablations (SRA paper, section 5): span KL only (use_cos=use_geo=false), KL + geometric (use_cos=false),
KL + cosine (use_geo=false), cosine + geometric without KL (use_kl=false), mean pooling (weighted_pooling=false),
uniform span weights (weighted_loss=false).

Each run is two subprocesses, `python -m sra_distill distill ...` then `python -m sra_distill evaluate ...`, under
`--work-dir/<budget>/<run>/`. A run whose result file exists is skipped, and training checkpoints every quarter
of the run with `resume=true`, so an interrupted benchmark continues where it stopped (a resumed run's train
wall time then counts only the part after the restart). The markdown report is rewritten after every run.
Each finished run's result, with its per-example scores (what the paired bootstrap needs), is also kept in a
small committed record beside the report (`quality.runs.json`): rows whose run folders are gone (another
machine, a cleaned `runs/`) are read from there, and are not run again.
Sizing on 2 quiet CPU cores: about 8 min of training (SRA) and about 14 min of evaluation (600 generations) per
row. Runs in the background:

    nohup python benchmarks/quality.py > quality.log 2>&1 &
    python benchmarks/quality.py --methods untrained,sft,sra    # a subset of rows
    python benchmarks/quality.py --quick          # tiny random models, seconds per run (smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "quality.md"
EVAL_SETS = {  # test splits of the MiniLLM/DSKD lineage
    "dolly": "dolly/valid.jsonl",  # 500 examples
    "self-inst": "self-inst/valid.jsonl",  # 242 examples
}
BOOTSTRAP_SAMPLES = 10_000
CE_WINDOW = 10  # "final train CE" = mean CE of the last CE_WINDOW logged steps (one step is noisy)


@dataclass(frozen=True)
class Run:
    """One row of the table: a name (used for folders and --methods), a label and the config overrides."""

    name: str
    label: str
    overrides: tuple[str, ...] = ()
    trains: bool = True  # False: evaluate the teacher as it is (reference row)


def _sra(*switches: str) -> tuple[str, ...]:
    return ("method=sra", *(f"methods.sra.{s}" for s in switches))


RUNS: tuple[Run, ...] = (  # in running order: the references and the main methods first, the ablations last
    Run("untrained", "Student before training (reference)", trains=False),
    Run("sft", "SFT (CE only)", ("method=sft",)),
    Run("sra", "SRA (full)", _sra()),
    # The recipe issue 17's dev-set study recommends (benchmarks/sra_study.py): the paper's SRA with the span KL
    # averaged over spans instead of summed per sample.
    Run("sra_recommended", "SRA, recommended recipe (span KL mean over spans)", _sra("kl_normalization=mean")),
    Run("teacher", "Teacher (no training, reference)", trains=False),
    Run("uld", "ULD", ("method=uld",)),
    Run("mined", "MinED", ("method=mined",)),
    Run("dskd", "DSKD (CMA)", ("method=dskd",)),
    Run("multilevel_ot", "MultiLevelOT", ("method=multilevel_ot",)),
    Run("alm", "ALM", ("method=alm",)),
    Run("sra_kl_only", "SRA ablation: span KL only", _sra("use_cos=false", "use_geo=false")),
    Run("sra_kl_geo", "SRA ablation: KL + geometric", _sra("use_cos=false")),
    Run("sra_kl_cos", "SRA ablation: KL + cosine", _sra("use_geo=false")),
    Run("sra_cos_geo", "SRA ablation: cosine + geometric, no KL", _sra("use_kl=false")),
    Run("sra_mean_pool", "SRA ablation: mean pooling", _sra("weighted_pooling=false")),
    Run("sra_uniform_w", "SRA ablation: uniform span weights", _sra("weighted_loss=false")),
)
BASELINES = ("sft", "uld", "mined", "dskd", "multilevel_ot", "alm")  # what SRA is compared with by paired bootstrap
SRA_ROWS = ("sra", "sra_recommended")  # the SRA rows compared with the best baseline
RUNS_BY_NAME = {run.name: run for run in RUNS}


@dataclass(frozen=True)
class Budget:
    """What every run shares. `config` None = the built-in defaults (the demo pair)."""

    config: str | None
    steps: int
    batch_size: int
    max_length: int
    warmup_steps: int
    eval_examples: int
    seeds: tuple[int, ...]
    max_new_tokens: int
    eval_sets: tuple[str, ...] = ("dolly",)
    # Every run reads its teacher from a cache (`teacher_cache=auto`: built by the first run of a method and
    # settings, read by its other seeds; exact, the pair's teacher is fp32), so the teacher runs once, not per run.
    teacher_cache: bool = True

    def tag(self) -> str:
        """Folder name: results of a different budget never mix."""
        pair = Path(self.config).stem if self.config else "demo"
        return f"{pair}-s{self.steps}-b{self.batch_size}-l{self.max_length}"

    def eval_tag(self) -> str:
        sets = "" if self.eval_sets == ("dolly",) else "-" + "_".join(self.eval_sets)
        return f"eval-n{self.eval_examples}-t{self.max_new_tokens}-seeds{'_'.join(map(str, self.seeds))}{sets}"

    def train_overrides(self) -> list[str]:
        return [
            f"max_steps={self.steps}", f"batch_size={self.batch_size}", f"max_length={self.max_length}",
            f"warmup_steps={self.warmup_steps}", "eval_every=0", f"save_every={max(1, self.steps // 4)}",
            "keep_last=1", "resume=true", "demo_prompt=null", "demo_eval_seeds=null", "progress=false",
        ]


# The pair is the built-in default: SmolLM2-135M-Instruct (fp32) teaching its own body re-tokenised for Llama-2
# (`student: from:smollm2-135m-instruct`, full depth, ~125M parameters, trained in full at lr 5e-5). Sizing on 2
# quiet CPU cores: see benchmarks/results/quality.md (train and eval wall time per run are in the table).
FULL_BUDGET = dict(config=None, steps=24, batch_size=8, max_length=192, warmup_steps=3,
                   eval_examples=100, seeds=(10, 20, 30), max_new_tokens=64, eval_sets=("dolly", "self-inst"))
QUICK_BUDGET = dict(config=str(REPO / "src/sra_distill/configs/tiny.yaml"), steps=2, batch_size=4, max_length=128,
                    warmup_steps=1, eval_examples=2, seeds=(10,), max_new_tokens=8, eval_sets=("dolly", "self-inst"))


def _environment() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # The subprocesses import the package from this checkout even when it is not installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


def _call(args: list[str], log: Path) -> tuple[int, float]:
    """Run `python -m sra_distill ARGS` with output to `log`; return (exit status, wall seconds)."""
    started = time.perf_counter()
    with log.open("w") as fh:
        fh.write("$ " + " ".join(args) + "\n")
        fh.flush()
        rc = subprocess.call([sys.executable, "-m", "sra_distill", *args], stdout=fh, stderr=subprocess.STDOUT,
                             cwd=REPO, env=_environment())
    return rc, time.perf_counter() - started


def _tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def final_train_ce(metrics_path: Path, window: int = CE_WINDOW) -> float:
    """Mean student CE of the last `window` logged steps of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{metrics_path} has no rows")
    return float(np.mean([r["ce"] for r in rows[-window:]]))


def reference_model(run: Run, budget: Budget) -> list[str] | None:
    """`sra evaluate` model arguments of a reference row: the teacher, or the student before training (a
    `from:MODEL` student, built as training builds it). None when that model is random (nothing to score)."""
    from sra_distill.config import load_config

    cfg = load_config(budget.config, [])
    if run.name == "teacher":
        model, tokenizer = cfg.teacher, cfg.teacher_tokenizer
    else:
        model, tokenizer = cfg.student, cfg.student_tokenizer
    if model.startswith("random:"):
        return None
    return ["--model", model, *(["--tokenizer", tokenizer] if tokenizer else [])]


def per_example_scores(eval_dir: Path) -> dict[str, np.ndarray]:
    """ROUGE-L x100 per example of each set, averaged over the sampling seeds (from predictions.jsonl)."""
    sums: dict[str, dict[int, list[float]]] = {}
    for line in (eval_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        sums.setdefault(row["set"], {}).setdefault(row["index"], []).append(100.0 * row["rougeL"])
    return {name: np.array([np.mean(by_index[i]) for i in sorted(by_index)]) for name, by_index in sums.items()}


def example_scores(result: dict, run_dir: Path) -> dict[str, np.ndarray] | None:
    """A finished run's per-example scores: from its result (the record keeps them), else from its run folder;
    None when neither has them (rows recorded before results kept them)."""
    if result.get("per_example"):
        return {name: np.asarray(values) for name, values in result["per_example"].items()}
    eval_dir = run_dir / result.get("eval_dir", "")
    return per_example_scores(eval_dir) if (eval_dir / "predictions.jsonl").exists() else None


def record_path(report: Path) -> Path:
    """The committed record beside a report: finished results (with per-example scores) by budget."""
    return report.with_name(report.stem + ".runs.json")


def _record_key(budget: Budget) -> str:
    return f"{budget.tag()}/{budget.eval_tag()}"


def load_record(path: Path, budget: Budget) -> dict[str, dict]:
    """The finished results of `budget` kept in the record at `path` ({} when there is none)."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text()).get(_record_key(budget), {})
    except json.JSONDecodeError as err:
        raise SystemExit(f"{path}: not valid JSON ({err}); fix or remove it") from None


@contextlib.contextmanager
def exclusive(path: Path):
    """Hold an exclusive lock beside `path`: two benchmark processes may read-update-write one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def save_record(path: Path, budget: Budget, results: dict[str, dict]) -> None:
    """Merge `results` into the record (other budgets' entries are kept)."""
    with exclusive(path):
        data = json.loads(path.read_text()) if path.exists() else {}
        data.setdefault(_record_key(budget), {}).update(results)
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def finished_results(names: list[str], root: Path, budget: Budget, kept: dict[str, dict], tag: str) -> dict[str, dict]:
    """The finished runs among `names`: each from its run folder's result file (over what the record kept), else
    from the record `kept`."""
    results = {}
    for name in names:
        done = root / name / f"result-{budget.eval_tag()}.json"
        if done.exists() and "sets" in json.loads(done.read_text()):
            results[name] = {**kept.get(name, {}), **json.loads(done.read_text())}
            print(f"[{tag}] {name}: already done, skipped ({done})", flush=True)
        elif name in kept:
            results[name] = kept[name]
            print(f"[{tag}] {name}: already done, read from the record", flush=True)
    return results


def paired_bootstrap(a: np.ndarray, b: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0):
    """Mean of a - b over examples and its 95% percentile interval, resampling examples with replacement."""
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired_bootstrap: need two score arrays of one non-zero length, got {a.shape}, {b.shape}")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(samples, diff.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def run_one(run: Run, budget: Budget, run_dir: Path) -> dict:
    """Train (unless a reference row) and evaluate one run; returns what `result.json` holds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    result: dict = dict(name=run.name, label=run.label, overrides=list(run.overrides), train_s=0.0, commit=_commit())
    if run.trains:
        trained = run_dir / "train.json"  # written once training finished: a new eval setting reuses the student
        if not trained.exists():
            config = ["--config", budget.config] if budget.config else []
            rc, train_s = _call(
                ["distill", *config, *budget.train_overrides(), *run.overrides, f"output_dir={run_dir}",
                 *(["teacher_cache=auto"] if budget.teacher_cache else [])],  # SFT reads no teacher: ignored
                run_dir / "train.log",
            )
            if rc != 0:
                raise RuntimeError(f"{run.name}: distill failed (exit {rc}); {run_dir / 'train.log'}:\n"
                                   + _tail(run_dir / "train.log"))
            info = dict(train_s=train_s, train_ce=final_train_ce(run_dir / "metrics.jsonl"))
            trained.write_text(json.dumps(info) + "\n")
        result.update(json.loads(trained.read_text()))
        model = ["--model", str(run_dir / "final")]
    else:
        model = reference_model(run, budget)
        if model is None:
            raise RuntimeError(f"{run.name}: this model of the budget is randomly initialised; nothing to evaluate")
    eval_dir = run_dir / budget.eval_tag()
    data = [arg for name in budget.eval_sets for arg in ("--data", f"{name}={EVAL_SETS[name]}")]
    rc, result["eval_s"] = _call(
        ["evaluate", *model, *data, "--max-examples", str(budget.eval_examples),
         "--seeds", ",".join(map(str, budget.seeds)), "--max-new-tokens", str(budget.max_new_tokens),
         "--batch-size", "50", "--dtype", "fp32", "--no-progress", "--output", str(eval_dir)],
        run_dir / "eval.log",
    )
    if rc != 0:
        raise RuntimeError(f"{run.name}: evaluate failed (exit {rc}); {run_dir / 'eval.log'}:\n"
                           + _tail(run_dir / "eval.log"))
    sets = json.loads((eval_dir / "scores.json").read_text())["sets"]
    result["sets"] = {name: dict(mean=sets[name]["mean"], std=sets[name]["std"], per_seed=sets[name]["per_seed"],
                                 n_examples=sets[name]["n_examples"]) for name in budget.eval_sets}
    result["rouge_l_mean"] = float(np.mean([v["mean"] for v in result["sets"].values()]))
    result["rouge_l_std"] = float(max(v["std"] for v in result["sets"].values()))
    result["eval_dir"] = str(eval_dir.relative_to(run_dir))
    result["per_example"] = {name: [round(float(x), 4) for x in values]
                             for name, values in per_example_scores(eval_dir).items()}
    return result


# ------------------------------------------------------------------------------------------------ report

def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [l.split(":", 1)[1].strip() for l in cpuinfo.read_text().splitlines() if l.startswith("model name")]
        cpu = names[0] if names else cpu
    return (f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {version('torch')}, transformers {version('transformers')}")


def _commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "HEAD") or "unknown (not a git checkout)"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return head + (" (working tree has uncommitted changes)" if dirty else "")


def _row_commits(results: dict[str, dict]) -> str:
    """The commits the rows were run at, where that is not just the report's own."""
    commits = sorted({r["commit"] for r in results.values() if r.get("commit")} - {_commit()})
    return f"; rows run at: {', '.join(f'`{c}`' for c in commits)}" if commits else ""


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _set_cell(r: dict, name: str) -> str:
    v = r["sets"][name]
    return f"{v['mean']:.2f} ± {v['std']:.2f}"


def update_comparisons(root: Path, results: dict[str, dict], budget: Budget) -> None:
    """Each SRA row (the paper's and the recommended recipe) against the best baseline (by the average over sets):
    paired bootstrap over examples, stored in the SRA row's result as `bootstrap`. A comparison that cannot be
    recomputed (a side's per-example scores were never kept) keeps what was stored, if it is against the same
    baseline."""
    baselines = [results[n] for n in BASELINES if n in results]
    if not baselines:
        return
    best = max(baselines, key=lambda r: r["rouge_l_mean"])
    best_scores = example_scores(best, root / best["name"])
    for name in SRA_ROWS:
        if name not in results:
            continue
        sra = results[name]
        sra_scores = example_scores(sra, root / name)
        if sra_scores is None or best_scores is None:
            if sra.get("bootstrap", {}).get("against") != best["name"]:
                sra["bootstrap"] = dict(against=best["name"], rows=None)
            continue
        rows = []
        for set_name in budget.eval_sets:
            rows.append([set_name, *paired_bootstrap(sra_scores[set_name], best_scores[set_name])])
        pooled = [np.concatenate([scores[n] for n in budget.eval_sets]) for scores in (sra_scores, best_scores)]
        rows.append(["all examples", *paired_bootstrap(*pooled)])
        sra["bootstrap"] = dict(against=best["name"], rows=rows)


def comparison_lines(results: dict[str, dict], budget: Budget) -> list[str]:
    """The stored comparisons of the SRA rows (see `update_comparisons`) as markdown."""
    lines = []
    for name in SRA_ROWS:
        stored = results.get(name, {}).get("bootstrap")
        if not stored or stored["against"] not in results:
            continue
        sra, best = results[name], results[stored["against"]]
        head = f"**{sra['label']} against the best baseline ({best['label']})**"
        if stored["rows"] is None:
            lines += ["", f"{head}: not computed; the per-example scores of one side were not kept."]
            continue
        lines += ["", f"{head}, paired bootstrap over examples ({BOOTSTRAP_SAMPLES} resamples; each example's "
                  f"ROUGE-L is its mean over the {len(budget.seeds)} sampling seeds): mean difference SRA - "
                  "baseline and its 95% interval.", "", "| set | SRA - baseline | 95% interval |", "|---|---|---|"]
        lines += [f"| {set_name} | {diff:+.2f} | [{low:+.2f}, {high:+.2f}] |" for set_name, diff, low, high in
                  stored["rows"]]
    return lines


def render_report(budget: Budget, runs: list[Run], results: dict[str, dict], failures: dict[str, str],
                  total_s: float, quick: bool) -> str:
    """The markdown report: budget, machine, commit, the table (pending rows for runs not done), the comparison."""
    pair = f"`{budget.config}` (tiny random models: smoke test, numbers meaningless)" if quick else (
        "built-in defaults: SmolLM2-135M-Instruct fp32 teacher -> its own body with the Llama-2 tokenizer "
        "(`student: from:smollm2-135m-instruct`, ~125M parameters, full depth)")
    sets = ", ".join(f"{name} (`{EVAL_SETS[name]}`)" for name in budget.eval_sets)
    lines = [
        "# Quality benchmark: cross-tokenizer methods, SFT and SRA ablations on a pretrained student",
        "",
        "Written by `benchmarks/quality.py` (see its docstring). Same pair, data (Dolly train), training seed (42),",
        "steps and batch for every run; only the method (or the SRA ablation switch) changes.",
        "",
        "**Reduced protocol.** ROUGE-L of the DSKD/MiniLLM lineage (`sra_distill.evaluation.evaluate`: sampling at",
        "temperature 1, top_p 1, no top-k, no-repeat-ngram 6, ROUGE-L F1 x100, max over references), but on the",
        f"first {budget.eval_examples} examples of {sets}, sampling seeds {', '.join(map(str, budget.seeds))}",
        f"instead of 10-50, and {budget.max_new_tokens} new tokens instead of 256, to fit 2 CPU cores. Scores are",
        "not comparable with the paper's.",
        "",
        f"- Pair: {pair}",
        f"- Budget: {budget.steps} optimiser steps, batch {budget.batch_size}, max_length {budget.max_length}, "
        f"warm-up {budget.warmup_steps}, otherwise the pair's defaults (see `sra config`)",
        f"- Evaluation: {budget.eval_examples} examples per set x {len(budget.seeds)} seeds, "
        f"{budget.max_new_tokens} new tokens; mean ± population std over seeds; `avg` = mean over the sets",
        f"- Final train CE: mean student CE (response tokens) over the last {CE_WINDOW} steps",
        f"- Machine: {_machine()}",
        f"- Commit: `{_commit()}`" + _row_commits(results),
        f"- Written: {datetime.datetime.now().isoformat(timespec='seconds')}; wall time of this invocation "
        f"{_minutes(total_s)} (runs skipped as already done are not in it)",
        "",
        "| run | " + " | ".join(budget.eval_sets) + " | avg | gain over untrained | final train CE | train wall | "
        "eval wall |",
        "|---|" + "---|" * (len(budget.eval_sets) + 6),
    ]
    base = results.get("untrained")
    for run in runs:
        r = results.get(run.name)
        if r is None:
            status = "failed (see log)" if run.name in failures else "pending"
            lines.append(f"| {run.label} | {status} |" + " |" * (len(budget.eval_sets) + 5))
            continue
        ce = f"{r['train_ce']:.3f}" if "train_ce" in r else "-"
        gain = f"{r['rouge_l_mean'] - base['rouge_l_mean']:+.2f}" if base and run.name != "untrained" else "-"
        train = _minutes(r["train_s"]) if run.trains else "-"
        cells = " | ".join(_set_cell(r, name) for name in budget.eval_sets)
        lines.append(f"| {run.label} | {cells} | {r['rouge_l_mean']:.2f} | {gain} | {ce} | {train} | "
                     f"{_minutes(r['eval_s'])} |")
    students = {name: r for name, r in results.items() if RUNS_BY_NAME[name].trains}
    if len(students) > 1:
        best = max(students.values(), key=lambda r: r["rouge_l_mean"])
        worst = min(students.values(), key=lambda r: r["rouge_l_mean"])
        gap = best["rouge_l_mean"] - worst["rouge_l_mean"]
        seed_std = max(r["rouge_l_std"] for r in students.values())
        verdict = "separates" if gap > 2 * seed_std else "does NOT separate"
        lines += ["", f"Best student: **{best['label']}** (avg {best['rouge_l_mean']:.2f}); worst: {worst['label']} "
                  f"(avg {worst['rouge_l_mean']:.2f}). Spread {gap:.2f} points against a largest per-set seed std "
                  f"of {seed_std:.2f}: this budget {verdict} the methods (criterion: spread > 2 x seed std)."]
    lines += comparison_lines(results, budget)
    by_note: dict[str, list[str]] = {}
    for r in results.values():
        if r.get("note"):
            by_note.setdefault(r["note"], []).append(r["label"])
    for note, labels in by_note.items():
        lines += ["", f"Kept rows ({'; '.join(labels)}): {note}."]
    for name, message in failures.items():
        lines += ["", f"**{name} failed:**", "", "```", message, "```"]
    total_runs = sum(r["train_s"] + r["eval_s"] for r in results.values())
    lines += ["", f"Sum of per-run wall times: {_minutes(total_runs)}.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random config, 2 steps, 2 eval examples, 1 seed")
    p.add_argument("--methods", help=f"comma-separated runs (default all): {', '.join(RUNS_BY_NAME)}")
    p.add_argument("--steps", type=int, help="optimiser steps per run")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--eval-examples", type=int, help="first N Dolly test examples")
    p.add_argument("--seeds", help="comma-separated sampling seeds")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--sets", help=f"comma-separated evaluation sets (default dolly,self-inst): {', '.join(EVAL_SETS)}")
    p.add_argument("--output", type=Path, help="markdown report (default benchmarks/results/quality.md; "
                                               "--quick: WORK_DIR/quality-quick.md)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report from the finished runs, run nothing")
    p.add_argument("--no-teacher-cache", action="store_true",
                   help="run the live teacher in every run instead of reading it from a cache built once")
    p.add_argument("--work-dir", type=Path, help="run folders (default runs/quality, --quick: runs/quality-quick)")
    return p.parse_args(argv)


def budget_from_args(args: argparse.Namespace) -> Budget:
    values = dict(QUICK_BUDGET if args.quick else FULL_BUDGET)
    for key in ("steps", "batch_size", "max_length", "eval_examples", "max_new_tokens"):
        given = getattr(args, key)
        if given is not None:
            if given < 1:
                raise SystemExit(f"quality.py: --{key.replace('_', '-')} must be >= 1, got {given}")
            values[key] = given
    if args.seeds:
        try:
            values["seeds"] = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        except ValueError:
            raise SystemExit(f"quality.py: --seeds must be comma-separated integers, got {args.seeds!r}") from None
        if not values["seeds"]:
            raise SystemExit("quality.py: --seeds is empty")
    values["teacher_cache"] = not args.no_teacher_cache
    if args.sets:
        values["eval_sets"] = tuple(n.strip() for n in args.sets.split(",") if n.strip())
        unknown = [n for n in values["eval_sets"] if n not in EVAL_SETS]
        if unknown or not values["eval_sets"]:
            raise SystemExit(f"quality.py: unknown set(s) {unknown or args.sets!r}; choose from {', '.join(EVAL_SETS)}")
    values["warmup_steps"] = min(values["warmup_steps"], max(0, values["steps"] // 10))
    return Budget(**values)


def select_runs(text: str | None, quick: bool) -> list[Run]:
    if not text:
        # The tiny config's models are random: there is no teacher or untrained student to score in quick mode.
        return [r for r in RUNS if r.trains or not quick]
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS_BY_NAME]
    if unknown or not names:
        raise SystemExit(f"quality.py: unknown run(s) {unknown or text!r}; choose from {', '.join(RUNS_BY_NAME)}")
    return [RUNS_BY_NAME[n] for n in names]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = budget_from_args(args)
    runs = select_runs(args.methods, args.quick)
    work = args.work_dir or REPO / "runs" / ("quality-quick" if args.quick else "quality")
    output = args.output or (work / "quality-quick.md" if args.quick else DEFAULT_OUTPUT)
    record = record_path(output)
    kept = load_record(record, budget)
    root = work / budget.tag()
    started = time.perf_counter()
    # Every finished row first, so each report written along the way shows all of them (and the right best row).
    results = finished_results([run.name for run in runs], root, budget, kept, "quality")
    failures: dict[str, str] = {}

    def write_report() -> None:
        update_comparisons(root, results, budget)
        save_record(record, budget, results)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(render_report(budget, runs, results, failures, time.perf_counter() - started, args.quick))

    for run in runs:
        done = root / run.name / f"result-{budget.eval_tag()}.json"
        if run.name in results or args.report_only:
            continue
        print(f"[quality] {run.name}: running ({root / run.name})", flush=True)
        try:
            result = run_one(run, budget, root / run.name)
        except RuntimeError as err:
            failures[run.name] = str(err)
            print(f"[quality] {err}", file=sys.stderr, flush=True)
        else:
            done.write_text(json.dumps(result, indent=1) + "\n")
            results[run.name] = result
            print(f"[quality] {run.name}: ROUGE-L {result['rouge_l_mean']:.2f} ± {result['rouge_l_std']:.2f} "
                  f"(train {result['train_s']:.0f} s, eval {result['eval_s']:.0f} s)", flush=True)
        write_report()
    write_report()
    print(f"[quality] wrote {output}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
