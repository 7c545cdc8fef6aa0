"""On-policy comparison: off-policy SRA against SRA with `on_policy.ratio=0.5`, same pair, steps, batch and seed.

Pair and budget: the quality benchmark's (`benchmarks/quality.py`): the demo pair (SmolLM2-135M-Instruct bf16
teacher -> random ~7M GPT-2 student, Dolly train), 32 optimiser steps of batch 8 at max_length 192, warm-up 3;
the students are scored with the same reduced ROUGE-L protocol (first 50 Dolly test examples, sampling seeds
10/20/30, 64 new tokens). The on-policy run samples answers of at most `--on-policy-tokens` (64) student tokens at
temperature 1, top_p 1, and leaves CE on generated text off (the defaults).

Cost of generation, from the on-policy run's own metrics.jsonl: each on-policy step logs its generation seconds
inside its step time, so `step_s / (step_s - generation_s)` is the slowdown of that step measured within the step
itself (same machine state; robust on a shared machine whose load changes). Also reported: mean step time of the
run's on-policy and off-policy steps, and of the off-policy run (two runs: noisier). The first step of each run
is left out of the means (warm-up: allocations, first calls). `--steps`, `--batch-size`, `--max-length`,
`--eval-examples`, `--seeds`, `--max-new-tokens` shrink the budget for a loaded machine.

Each run is a pair of subprocesses through `quality.run_one` (train, then evaluate); a finished run's result file
is reused and training checkpoints every quarter with resume=true, so an interrupted invocation continues. Runs
in the background:

    nohup python benchmarks/on_policy.py > on_policy.log 2>&1 &
    python benchmarks/on_policy.py --quick        # tiny random pair, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (the quality benchmark's budget, runner and machine description)

REPO = quality.REPO
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "on_policy.md"


def runs(on_policy_tokens: int, ratio: float, max_length: int) -> list[quality.Run]:
    common = ("method=sra", f"max_prompt_length={min(128, max_length // 2)}")  # the demo's 128 needs max_length > 128
    return [
        quality.Run("sra", "SRA, off-policy (dataset responses)", common),
        quality.Run(f"sra_on_policy_{ratio:g}", f"SRA, on-policy ratio {ratio:g}",
                    (*common, f"on_policy.ratio={ratio}", f"on_policy.max_new_tokens={on_policy_tokens}")),
    ]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def step_costs(metrics_path: Path) -> dict:
    """Per-kind step times and generation figures of one run's metrics.jsonl (first step of each kind left out)."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    on = [r for r in rows if r.get("on_policy")]
    off = [r for r in rows if not r.get("on_policy")]
    first = rows[0]["step"] if rows else None
    on_timed = [r for r in on if r["step"] != first]
    out = {
        "steps": len(rows), "on_policy_steps": len(on),
        "off_step_s": _mean([r["step_s"] for r in off if r["step"] != first]),
        "on_step_s": _mean([r["step_s"] for r in on_timed]),
        "generation_s": _mean([r["generation_s"] for r in on_timed]),
        "rest_of_step_s": _mean([r["step_s"] - r["generation_s"] for r in on_timed]),
        "slowdown_within_step": _mean([r["step_s"] / (r["step_s"] - r["generation_s"]) for r in on_timed]),
        "generated_tokens": _mean([r["generated_tokens"] for r in on]),
        "degenerate": sum(r.get("degenerate", 0) for r in on),
        "fallback_batches": sum(r.get("on_policy_fallback_batches", 0) for r in on),
        "mean_step_s": _mean([r["step_s"] for r in rows[1:]]),
    }
    return out


def _f(value, spec=".2f", none="-") -> str:
    return none if value is None else format(value, spec)


def render(budget: quality.Budget, run_list, results: dict, costs: dict, args, total_s: float) -> str:
    pair = (f"`{budget.config}` (tiny random models: smoke test, numbers meaningless)" if args.quick else
            "built-in defaults = `--config demo`: SmolLM2-135M-Instruct bf16 teacher -> randomly initialised "
            "~7M GPT-2 student (the `from:` pretrained student form was not on main's history when this ran)")
    lines = [
        "# On-policy distillation: off-policy SRA vs on-policy ratio " + f"{args.ratio:g}",
        "",
        "Written by `benchmarks/on_policy.py` (see its docstring); command:",
        "",
        "```",
        "python benchmarks/on_policy.py " + " ".join(args.argv),
        "```",
        "",
        f"- Pair: {pair}",
        f"- Budget (both runs): {budget.steps} optimiser steps, batch {budget.batch_size}, max_length "
        f"{budget.max_length} (prompt {min(128, budget.max_length // 2)}), warm-up {budget.warmup_steps}, seed 42, alpha 0.5, SRA defaults",
        f"- On-policy run: `on_policy.ratio={args.ratio:g}`, `on_policy.max_new_tokens={args.on_policy_tokens}`, "
        "temperature 1, top_p 1, CE on generated text off",
        f"- Evaluation (reduced ROUGE-L protocol of `benchmarks/quality.py`): first {budget.eval_examples} Dolly test "
        f"examples, sampling seeds {', '.join(map(str, budget.seeds))}, {budget.max_new_tokens} new tokens; "
        "mean ± population std over seeds",
        f"- Machine: {quality._machine()} (shared with other jobs: wall times are noisy)",
        f"- Commit: `{quality._commit()}`",
        f"- Written: {datetime.datetime.now().isoformat(timespec='seconds')}; this invocation {total_s / 60:.1f} min",
        "",
        "| run | ROUGE-L (mean ± std) | per seed | final train CE | train wall | on-policy steps | mean step s |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in run_list:
        r = results.get(run.name)
        if r is None:
            lines.append(f"| {run.label} | pending | | | | | |")
            continue
        c = costs[run.name]
        per_seed = ", ".join(f"{v:.2f}" for v in r["rouge_l_per_seed"])
        lines.append(f"| {run.label} | {r['rouge_l_mean']:.2f} ± {r['rouge_l_std']:.2f} | {per_seed} | "
                     f"{r['train_ce']:.3f} | {r['train_s'] / 60:.1f} min | {c['on_policy_steps']}/{c['steps']} | "
                     f"{_f(c['mean_step_s'])} |")
    on_name = run_list[1].name
    if on_name in costs:
        c = costs[on_name]
        lines += [
            "",
            f"Realised on-policy steps: {c['on_policy_steps']} of {c['steps']} (each step is on-policy with probability "
            f"{args.ratio:g}, drawn from (seed, step), so a short run's share can sit far from the ratio). The "
            "on-policy run's final train CE averages, on its on-policy steps, the student's CE on its OWN answers "
            "(logged, not in the loss): it is not comparable with the off-policy row.",
            "",
            f"Sum of per-run wall times (train + evaluation): "
            f"{sum(r['train_s'] + r['eval_s'] for r in results.values()) / 60:.1f} min.",
            "",
            "Step-time cost of generation (means over the on-policy run's on-policy steps, its first step left out):",
            "",
            f"- on-policy step {_f(c['on_step_s'])} s = generation {_f(c['generation_s'])} s + the rest "
            f"{_f(c['rest_of_step_s'])} s (teacher, student, loss, update, re-pairing): a step costs "
            f"x{_f(c['slowdown_within_step'])} of the same step without generation, measured within each step",
            f"- mean step time: on-policy steps {_f(c['on_step_s'])} s, this run's off-policy steps "
            f"{_f(c['off_step_s'])} s, the off-policy run's steps {_f(costs[run_list[0].name]['off_step_s'])} s "
            "(across steps and runs: the machine's load moves these)",
            f"- mean generated length: {_f(c['generated_tokens'], '.1f')} student tokens (limit "
            f"{args.on_policy_tokens}); degenerate answers skipped: {c['degenerate']}; micro-batches that fell "
            f"back to dataset responses: {c['fallback_batches']}",
        ]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random pair, 2 steps (smoke test)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--eval-examples", type=int)
    p.add_argument("--max-new-tokens", type=int, help="evaluation answer length")
    p.add_argument("--seeds", help="comma-separated evaluation sampling seeds")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--on-policy-tokens", type=int, default=64)
    p.add_argument("--output", type=Path)
    p.add_argument("--work-dir", type=Path)
    args = p.parse_args(argv)
    args.argv = argv
    values = dict(quality.QUICK_BUDGET if args.quick else quality.FULL_BUDGET)
    for key in ("steps", "batch_size", "max_length", "eval_examples", "max_new_tokens"):
        if getattr(args, key):
            values[key] = getattr(args, key)
    if args.seeds:
        values["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    values["warmup_steps"] = min(values["warmup_steps"], max(0, values["steps"] // 10))
    budget = quality.Budget(**values)
    work = args.work_dir or REPO / "runs" / ("on-policy-quick" if args.quick else "on-policy")
    output = args.output or (work / "on_policy-quick.md" if args.quick else DEFAULT_OUTPUT)
    root = work / budget.tag()
    run_list = runs(args.on_policy_tokens, args.ratio, budget.max_length)
    started = time.perf_counter()
    results, costs = {}, {}
    for run in run_list:
        done = root / run.name / f"result-{budget.eval_tag()}.json"
        if done.exists():
            results[run.name] = json.loads(done.read_text())
        else:
            print(f"[on_policy] {run.name}: running ({root / run.name})", flush=True)
            results[run.name] = quality.run_one(run, budget, root / run.name)
            done.write_text(json.dumps(results[run.name], indent=1) + "\n")
        costs[run.name] = step_costs(root / run.name / "metrics.jsonl")
        print(f"[on_policy] {run.name}: ROUGE-L {results[run.name]['rouge_l_mean']:.2f}, {costs[run.name]}",
              flush=True)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(render(budget, run_list, results, costs, args, time.perf_counter() - started))
    print(f"[on_policy] wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
