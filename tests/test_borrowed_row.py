"""benchmarks/borrowed_row.py: a teacher-free row of one comparison judged against another's rows, only when the two
differ in the teacher alone; the differences are compare's own paired bootstrap."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from sra_distill.compare import paired_bootstrap

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "borrowed_row.py"
spec = importlib.util.spec_from_file_location("borrowed_row", SCRIPT)
borrowed_row = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = borrowed_row
spec.loader.exec_module(borrowed_row)

PROTOCOL = {"test_sets": {"dolly": "dolly/valid.jsonl"}, "test_examples": 3, "test_seeds": [10]}


def comparison(folder: Path, teacher: str, candidates: dict, runs: dict, **settings) -> Path:
    folder.mkdir()
    base = {"settings": {"teacher": teacher, "student": "from:smollm2-135m-instruct", "max_steps": 24, **settings},
            "protocol": PROTOCOL, "teacher": "raw", "tuning": None}
    (folder / "compare.json").write_text(json.dumps({"base": base, "candidates": candidates}))
    rows = {f"{name}/{seed}": {"candidate": name, "seed": seed,
                               "test": {"average": float(np.mean(scores)), "per_example": {"dolly": scores}}}
            for (name, seed), scores in runs.items()}
    (folder / "results.json").write_text(json.dumps({"references": {}, "runs": rows}))
    return folder


def test_rows_are_judged_against_the_borrowed_sft_with_compares_bootstrap(tmp_path, capsys):
    here = comparison(tmp_path / "here", "gemma", {"mined": ["method=mined"]},
                      {("mined", 42): [3.0, 5.0, 10.0], ("mined", 43): [1.0, 1.0, 1.0]})
    there = comparison(tmp_path / "there", "smollm2", {"sft": ["method=sft"], "uld": ["method=uld"]},
                       {("sft", 42): [1.0, 2.0, 4.0], ("sft", 44): [0.0, 0.0, 0.0]})
    assert borrowed_row.main([str(here), str(there), "sft"]) == 0
    mean, low, high = paired_bootstrap(np.array([3.0, 5.0, 10.0]), np.array([1.0, 2.0, 4.0]))  # seed 42 only
    assert f"| mined | 42, 43 | 3.50 | {mean:+.2f} [{low:+.2f}, {high:+.2f}] (seeds [42]) |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="'uld' .* reads the teacher"):
        borrowed_row.main([str(here), str(there), "uld"])


def test_a_difference_beyond_the_teacher_is_refused(tmp_path):
    here = comparison(tmp_path / "here", "gemma", {}, {}, max_length=192)
    there = comparison(tmp_path / "there", "smollm2", {"sft": ["method=sft"]}, {("sft", 42): [1.0, 2.0, 3.0]},
                       max_length=256)
    with pytest.raises(SystemExit, match="base setting 'max_length' differs: 192 here, 256 there"):
        borrowed_row.main([str(here), str(there), "sft"])


def test_a_setting_added_since_one_folder_was_made_is_no_difference_at_its_default(tmp_path, capsys):
    """As `sra compare` re-opens a folder: `balance` came after `there` was made; `alpha` (its default) is how it ran."""
    here = comparison(tmp_path / "here", "gemma", {"mined": ["method=mined"], "sft": ["method=sft"]},
                      {("mined", 42): [3.0, 5.0, 10.0], ("sft", 42): [1.0, 2.0, 4.0]}, balance="alpha")
    there = comparison(tmp_path / "there", "smollm2", {"sft": ["method=sft"]}, {("sft", 42): [1.0, 2.0, 4.0]})
    assert borrowed_row.main([str(here), str(there), "sft"]) == 0
    assert "| mined | 42 |" in capsys.readouterr().out
    assert borrowed_row.main([str(there), str(here), "sft"]) == 0  # either folder may be the older one
    assert "| sft | 42 | 2.33 | +0.00" in capsys.readouterr().out


def test_a_setting_added_since_is_a_difference_away_from_its_default(tmp_path):
    here = comparison(tmp_path / "here", "gemma", {}, {}, balance="gradmag")
    there = comparison(tmp_path / "there", "smollm2", {"sft": ["method=sft"]}, {("sft", 42): [1.0, 2.0, 3.0]})
    with pytest.raises(SystemExit, match="base setting 'balance' differs: 'gradmag' here, None there"):
        borrowed_row.main([str(here), str(there), "sft"])
    with pytest.raises(SystemExit, match="base setting 'balance' differs: None here, 'gradmag' there"):
        borrowed_row.main([str(there), str(here), "sft"])
