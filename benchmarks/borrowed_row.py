"""Test differences of one comparison's rows against a teacher-free row (SFT) of another comparison.

An SFT run reads no teacher: two `sra compare` folders whose base settings differ only in the teacher train the same
SFT student at the same seed. This script checks that (every base setting but the teacher's, the protocol, and the
borrowed candidate's overrides; the borrowed method must not use a teacher), then prints each row of THIS folder
against the borrowed row: the mean test difference and its paired bootstrap interval over test examples, as
`compare.md`'s `vs SFT` column computes it (each example averaged over the sampling seeds and the training seeds
both rows share), so a second pair's table needs no rerun of an SFT it already has.

    python benchmarks/borrowed_row.py benchmarks/results/quality_tuned-s24-gemma-teacher \
        benchmarks/results/quality_tuned-s24 sft
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TEACHER_SETTINGS = ("teacher", "teacher_tokenizer", "teacher_arch", "teacher_adapter", "teacher_precision")


def load(folder: Path) -> tuple[dict, dict]:
    return (json.loads((folder / "compare.json").read_text()), json.loads((folder / "results.json").read_text()))


def check_same_student_runs(here: dict, there: dict, name: str) -> None:
    """SystemExit naming the first difference that could change the borrowed row's runs."""
    from sra_distill.compare import setting_differences
    from sra_distill.config import load_config, method_settings

    mine, theirs = here["base"], there["base"]
    # compare's own rule, both ways: a setting added to sra-distill after one folder was made is absent there, and
    # is no difference when the other folder holds it at its default (the default keeps the behaviour before it).
    ours, other = ({"settings": {k: v for k, v in b["settings"].items() if k not in TEACHER_SETTINGS}}
                   for b in (mine, theirs))
    the_other_way = {k for k, _, _ in setting_differences(other, ours)}
    diffs = [d for d in setting_differences(ours, other) if d[0] in the_other_way]
    if diffs:
        key, value_here, value_there = diffs[0]
        raise SystemExit(f"borrowed_row.py: base setting {key.removeprefix('settings.')!r} differs: {value_here!r} "
                         f"here, {value_there!r} there")
    if mine["protocol"] != theirs["protocol"]:
        raise SystemExit("borrowed_row.py: the dev/test protocols differ")
    if name not in there["candidates"]:
        raise SystemExit(f"borrowed_row.py: no candidate {name!r} there ({', '.join(there['candidates'])})")
    overrides = there["candidates"][name]
    if method_settings(load_config(None, list(overrides))).uses_teacher:
        raise SystemExit(f"borrowed_row.py: {name!r} ({' '.join(overrides)}) reads the teacher: its runs differ")


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from sra_distill.compare import Row, paired_bootstrap, summarise

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("here", type=Path, help="the comparison folder whose rows are judged")
    p.add_argument("there", type=Path, help="the comparison folder holding the teacher-free row")
    p.add_argument("candidate", help="the borrowed row's candidate name there (e.g. sft)")
    args = p.parse_args(argv)
    (here, here_results), (there, there_results) = load(args.here), load(args.there)
    check_same_student_runs(here, there, args.candidate)
    borrowed: Row = next(r for r in summarise(there, there_results) if r.name == args.candidate)
    print(f"Test differences against {args.candidate} of {args.there} (seeds {borrowed.seeds}); paired bootstrap "
          "over test examples, 95% interval:")
    print(f"| candidate | seeds | test avg | vs borrowed {args.candidate} |\n|---|---|---:|---|")
    for row in summarise(here, here_results):
        shared = sorted(set(row.seeds) & set(borrowed.seeds))
        if not shared:
            print(f"| {row.name} | {row.seeds} | | no training seed in common |")
            continue
        mean, low, high = paired_bootstrap(row.examples(shared), borrowed.examples(shared))
        print(f"| {row.name} | {', '.join(map(str, row.seeds))} | {sum(row.scores('test')) / len(row.runs):.2f} | "
              f"{mean:+.2f} [{low:+.2f}, {high:+.2f}] (seeds {shared}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
