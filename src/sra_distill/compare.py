"""`sra compare`: which method, and which recipe, for my pair at my budget.

One base (a config and overrides: the pair, the data, the budget) and a list of candidates (each a set of
overrides, usually `method=...`). Every candidate is trained at every training seed from the same base, then
scored with the evaluation protocol of `evaluate.py` (the DSKD/MiniLLM ROUGE-L) on a dev set, where the best
candidate is chosen, and on held-out test sets, where it is judged:

* per candidate: dev and test ROUGE-L as mean ± population std over training seeds (one seed: over sampling seeds);
* its test difference to the dev-selected best candidate and to SFT (the candidate `method=sft`), each with a
  paired bootstrap interval over test examples (each example's ROUGE-L averaged over the sampling seeds and over
  the training seeds both candidates share);
* train and evaluation wall time; a plot of the same.

The paper's protocol tunes the teacher on the training data first (`train/teacher_tuning.py`); `teacher="tuned"`
(the default) does that once, caches it, and every candidate distils from it. The teacher runs once per training
seed, not once per run: the candidates that read it (off-policy, with the base's teacher, data, lengths and budget)
share a teacher cache of the records that seed's runs read (`runs/teacher-cache/`), built before the first of them
trains; the others use `teacher_cache=auto`.

The output folder keeps `compare.json` (the base settings, the protocol and the candidates), each run's folder
under `runs/<candidate>/seed-<seed>/` (or under `runs_dir`, so that the output folder holds only small files that
can be committed), `results.json` (every finished run with its per-example scores, enough to
re-render and compare without the run folders), `compare.md` and `compare.png`. Run it again to resume: finished
runs are kept, an interrupted training resumes from its last checkpoint. Adding candidates or seeds to an existing
folder is allowed; other base settings, another protocol, or a candidate name reused with other overrides are
refused (the rows would not be comparable). Several comparisons may run at once on one folder, each with its own
candidates (one per core, say): every save merges under a lock, and the teacher and its caches are built once.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

# The engine, evaluation, teacher cache, validation, accelerate and matplotlib are imported inside the functions that
# use them: a comparison refused for its settings loads none of them.
from sra_distill.config import Config, config_to_dict, load_config, method_settings
from sra_distill.data.records import load_records_with_report
from sra_distill.errors import ConfigError
from sra_distill.paths import build_lock, resolve_config, resolve_data_path
from sra_distill.train.runfolder import intact_checkpoints
from sra_distill.train.teacher_tuning import TeacherTuning

BOOTSTRAP_SAMPLES = 10_000
# Settings that say where a run writes or how it reports, not what it learns: two bases differing only here are
# the same comparison. `seed` is each run's training seed.
NOT_THE_BASE = ("output_dir", "progress", "resume", "overwrite", "save_every", "keep_last", "report_to", "run_name",
                "log_every", "demo_prompt", "demo_eval_seeds", "demo_eval_examples", "teacher_cache", "seed",
                "num_workers")
# Settings that decide which training records a run reads and what a teacher cache holds for them
# (`teacher_cache.cache_settings`): candidates equal to the base here share one cache per training seed.
CACHE_SHARED = ("teacher", "teacher_tokenizer", "teacher_arch", "teacher_adapter", "teacher_precision",
                "student_tokenizer", "train_data", "max_train_examples", "max_length", "max_prompt_length",
                "max_steps", "epochs", "batch_size", "grad_accum")
DEFAULT_DEV = {"dolly-dev": "dolly/dev.jsonl"}
DEFAULT_TEST = {"dolly": "dolly/valid.jsonl", "self-inst": "self-inst/valid.jsonl"}


@dataclass(frozen=True)
class Candidate:
    """One row: a name (folder and table label) and the overrides that make it, applied over the base."""

    name: str
    overrides: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> "Candidate":
        """`sra` -> method=sra; `NAME=k=v k=v` (or `NAME:k=v,k=v`) -> those overrides."""
        text = text.strip()
        name, sep, rest = text.partition("=") if "=" in text.split(":")[0] else text.partition(":")
        if not sep:
            return cls(text, (f"method={text}",))
        overrides = tuple(o for o in rest.replace(",", " ").split() if o)
        if not name or not overrides or any("=" not in o for o in overrides):
            raise ConfigError(f"candidate {text!r}: write NAME (a method) or NAME=key=value [key=value ...]")
        return cls(name.strip(), overrides)


@dataclass(frozen=True)
class Protocol:
    """How every run is scored. CPU-sized defaults; the paper's: all examples of its five test sets, sampling
    seeds 10-50, 256 new tokens."""

    dev_sets: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_DEV))
    dev_examples: int | None = 50  # None: all
    dev_seeds: tuple[int, ...] = (10, 20)
    test_sets: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TEST))
    test_examples: int | None = 100
    test_seeds: tuple[int, ...] = (10, 20, 30)
    max_new_tokens: int = 64
    batch_size: int = 50
    dtype: str = "fp32"

    def check(self) -> None:
        for name in ("dev_examples", "test_examples", "max_new_tokens", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"compare: --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("dev_seeds", "test_seeds", "dev_sets", "test_sets"):
            if not getattr(self, name):
                raise ConfigError(f"compare: --{name.replace('_', '-')} is empty")
        both = set(self.dev_sets) & set(self.test_sets)
        if both:
            raise ConfigError(f"compare: {', '.join(sorted(both))} is both a dev and a test set; selection and "
                              f"judgement need separate data")


@dataclass
class Comparison:
    """Everything `run_comparison` needs. `teacher`: "tuned" (the paper's protocol) or "raw"."""

    output: Path
    candidates: list[Candidate]
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    seeds: tuple[int, ...] = (42, 43, 44)
    protocol: Protocol = field(default_factory=Protocol)
    teacher: str = "tuned"
    tuning: TeacherTuning | None = None  # None = its defaults
    references: tuple[str, ...] = ("teacher",)
    teacher_cache: bool = True
    progress: bool = True
    runs_dir: Path | None = None  # the run folders (models, predictions); None = OUTPUT/runs
    # A trained run's resumable checkpoints (weights and optimiser state: about 3x its final weights) are deleted
    # once it has finished training, since its final/ weights are all that scoring reads; True keeps them.
    keep_checkpoints: bool = False

    @property
    def runs(self) -> Path:
        return self.runs_dir or self.output / "runs"


# ------------------------------------------------------------------------------------------------ the base

def base_config(cmp: Comparison) -> Config:
    return load_config(cmp.config, list(cmp.overrides))


def base_identity(cmp: Comparison, base: Config) -> dict:
    """What every row must share: the resolved base settings (less `NOT_THE_BASE`), the protocol, the teacher."""
    settings = {k: v for k, v in config_to_dict(base).items() if k not in NOT_THE_BASE}
    tuning = dataclasses.asdict(cmp.tuning or TeacherTuning()) if cmp.teacher == "tuned" else None
    protocol = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cmp.protocol).items()}
    return dict(settings=settings, protocol=protocol, teacher=cmp.teacher, tuning=tuning)


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def setting_differences(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) of what differs between a folder's base identity and this comparison's. A
    setting added to sra-distill after the folder was made is no difference at its default (a new setting's default
    keeps the behaviour before it)."""
    a, b = _flat(old), _flat(new)
    defaults = _flat(dict(settings=config_to_dict(Config())))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not (k not in a and k in defaults and b[k] == defaults[k])]


def identity_differences(old: dict, new: dict) -> list[str]:
    """`setting_differences` as the "key old -> new" lines a refusal prints."""
    return [f"{k} {x!r} -> {y!r}" for k, x, y in setting_differences(old, new)]


def open_folder(cmp: Comparison, identity: dict) -> dict:
    """Create or re-open the output folder; refuse one holding another comparison. Returns its `compare.json`."""
    path = cmp.output / "compare.json"
    if path.is_file():
        state = json.loads(path.read_text())
        diffs = identity_differences(state["base"], identity)
        if diffs:
            shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
            raise ConfigError(f"--output {cmp.output}: holds a comparison with other base settings ({shown}); its rows "
                              f"would not be comparable with these, so name another --output")
        for cand in cmp.candidates:
            known = state["candidates"].get(cand.name)
            if known is not None and tuple(known) != cand.overrides:
                raise ConfigError(f"--output {cmp.output}: candidate {cand.name!r} was run there as "
                                  f"{' '.join(known)}; give these overrides ({' '.join(cand.overrides)}) another name")
    elif cmp.output.exists() and any(cmp.output.iterdir()):
        raise ConfigError(f"--output {cmp.output}: exists and is not a comparison folder (no compare.json); name "
                          f"another folder")
    else:
        state = dict(base=identity, candidates={})
    state["candidates"].update({c.name: list(c.overrides) for c in cmp.candidates})
    cmp.output.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=1) + "\n")
    return state


# ------------------------------------------------------------------------------------------------ one run

def run_overrides(cmp: Comparison, base: Config, cand: Candidate, seed: int, run_dir: Path,
                  teacher: str | None, cache: str | None = None) -> list[str]:
    """The overrides of one training run: the base's, the candidate's, then the run's own (seed, folder,
    checkpoints every quarter so an interrupted run resumes, the teacher and its cache: `cache`, the value to set
    (the seed's shared cache, or what an interrupted run started with), else `teacher_cache=auto`)."""
    steps = base.max_steps or 0
    own = [f"seed={seed}", f"output_dir={run_dir}", "resume=true", "overwrite=false", "demo_prompt=null",
           "demo_eval_seeds=null", f"progress={str(cmp.progress).lower()}"]
    if steps > 0 and base.save_every > steps // 2:
        own += [f"save_every={max(1, steps // 4)}", "keep_last=1"]
    if teacher is not None:
        own.append(f"teacher={teacher}")
    # SFT reads no teacher (ignored there); on-policy steps score the student's own answers, which no cache holds.
    if cache is not None:
        own.append(f"teacher_cache={cache}")
    elif cmp.teacher_cache and load_config(cmp.config, [*cmp.overrides, *cand.overrides]).on_policy.ratio == 0:
        own.append("teacher_cache=auto")
    return [*cmp.overrides, *cand.overrides, *own]


def started_teacher_cache(run_dir: Path) -> str | None:
    """The `teacher_cache` value an interrupted run was started with ("null" for none), from its newest checkpoint;
    None when it has none. It resumes with it: a resume checks every setting against the checkpoint, and which
    teacher source a run reads (live, or a cache of the same states) is not worth a refusal."""
    checkpoints = intact_checkpoints(run_dir, warn=lambda message: None)  # the run's own resume reports bad ones
    if not checkpoints:
        return None
    value = yaml.safe_load((checkpoints[0][1] / "config.yaml").read_text()).get("teacher_cache")
    return "null" if value is None else str(value)


def cache_sharers(cmp: Comparison, base: Config) -> list[Candidate]:
    """The candidates that can read one teacher cache per seed: they run the teacher, off-policy, and equal the base
    in `CACHE_SHARED`. Empty when fewer than two (one run pays the teacher the same live)."""
    if not cmp.teacher_cache:
        return []
    sharers = []
    for cand in cmp.candidates:
        cfg = load_config(cmp.config, [*cmp.overrides, *cand.overrides])
        if (method_settings(cfg).uses_teacher and cfg.on_policy.ratio == 0
                and all(getattr(cfg, key) == getattr(base, key) for key in CACHE_SHARED)):
            sharers.append(cand)
    return sharers if len(sharers) > 1 else []


def seed_teacher_cache(cmp: Comparison, sharers: list[Candidate], seed: int, teacher: str | None,
                       log: Callable[[str], None]) -> Path:
    """The teacher cache the sharers read at `seed`: the records their runs read, what each of their methods needs.
    Built once (under a lock: comparisons sharing the folder wait for it), named by the seed and the sharers'
    settings, so a later comparison with more candidates builds its own."""
    import torch
    from accelerate import Accelerator

    from sra_distill.train.engine import records_read
    from sra_distill.train.teacher_cache import MANIFEST_NAME, build_teacher_cache

    own = [f"seed={seed}", f"progress={str(cmp.progress).lower()}", *([f"teacher={teacher}"] if teacher else [])]
    configs = [load_config(cmp.config, [*cmp.overrides, *cand.overrides, *own]) for cand in sharers]
    key = json.dumps([[cand.name, cfg.method, config_to_dict(method_settings(cfg))]
                      for cand, cfg in zip(sharers, configs)], sort_keys=True, default=str)
    folder = cmp.runs / "teacher-cache" / f"seed-{seed}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    with build_lock(folder):
        if not (folder / MANIFEST_NAME).is_file():
            base = load_config(cmp.config, [*cmp.overrides, *own])
            records, _ = load_records_with_report(base.train_data, limit=base.max_train_examples)
            read = records_read(base, len(records))
            log(f"[compare] seed {seed}: one teacher cache of the {len(read)} records its runs read, for "
                f"{', '.join(c.name for c in sharers)} ({folder})")
            # The runs' own accelerate settings: accelerate keeps one state per process, which they then share.
            accelerator = Accelerator(mixed_precision=base.precision, cpu=not torch.accelerator.is_available())
            build_teacher_cache(base, folder, serves=configs, records=read, accelerator=accelerator)
    return folder


def train_run(cmp: Comparison, cand: Candidate, overrides: list[str], run_dir: Path) -> dict:
    """Train one candidate at one seed (resuming a checkpoint); returns train wall seconds and final train CE."""
    from sra_distill.train.engine import Trainer

    trained = run_dir / "trained.json"  # written once training finished: re-scoring never retrains
    if trained.is_file():
        return json.loads(trained.read_text())
    started = time.perf_counter()
    cfg = load_config(cmp.config, overrides)
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
        del trainer
        gc.collect()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ce = [r["ce"] for r in rows if "ce" in r][-10:]
    info = dict(train_s=time.perf_counter() - started, train_ce=float(np.mean(ce)) if ce else None)
    trained.write_text(json.dumps(info) + "\n")
    if not cmp.keep_checkpoints:  # after trained.json: the run is never resumed again
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return info


def score(model_dir: str, tokenizer: str | None, sets: dict[str, str], examples: int | None, seeds: tuple[int, ...],
          protocol: Protocol, out: Path, progress: bool, arch=None, layers=None) -> dict:
    """Scores of one model on some sets: per set mean/std/per-seed, and each example's ROUGE-L x100 averaged over
    the sampling seeds."""
    import torch

    from sra_distill.evaluation.evaluate import evaluate_model
    from sra_distill.models.load import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(model_dir, tokenizer=tokenizer, dtype=protocol.dtype, device=device, arch=arch,
                            layers=layers)
    model.eval()
    report = evaluate_model(model, tok, {n: _data(p) for n, p in sets.items()}, seeds, max_examples=examples,
                            output_dir=out, batch_size=protocol.batch_size, progress=progress,
                            max_new_tokens=protocol.max_new_tokens)
    del model
    gc.collect()
    per_example: dict[str, dict[int, list[float]]] = {}
    for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        per_example.setdefault(row["set"], {}).setdefault(row["index"], []).append(100.0 * row["rougeL"])
    return dict(
        sets={n: dict(mean=s["mean"], std=s["std"], per_seed=s["per_seed"]) for n, s in report["sets"].items()},
        average=report["average"],
        per_example={n: [round(float(np.mean(v[i])), 4) for i in sorted(v)] for n, v in per_example.items()},
    )


def _data(path: str) -> Path:
    return resolve_data_path(path)


# ------------------------------------------------------------------------------------------------ the loop

def _print(line: str) -> None:
    print(line, flush=True)  # a comparison runs for hours, often into a log file


def run_comparison(cmp: Comparison, log: Callable[[str], None] = _print) -> dict:
    """Run every missing (candidate, seed), the reference rows, and write the table and the plot. Returns
    `results.json`'s content."""
    cmp.protocol.check()
    if not cmp.candidates:
        raise ConfigError("compare: no candidates; name some with --candidates sft,sra,... or --candidate")
    if len({c.name for c in cmp.candidates}) != len(cmp.candidates):
        raise ConfigError("compare: two candidates share a name")
    if not cmp.seeds:
        raise ConfigError("compare: --seeds is empty")
    if cmp.teacher not in ("tuned", "raw"):
        raise ConfigError(f"compare: --teacher must be tuned or raw, got {cmp.teacher!r}")
    base = base_config(cmp)
    from sra_distill.validation import check_combinations

    for cand in cmp.candidates:  # every candidate's settings are checked before anything runs
        try:
            check_combinations(load_config(cmp.config, [*cmp.overrides, *cand.overrides]))
        except ConfigError as err:
            raise ConfigError(f"candidate {cand.name}: {err}") from None
    identity = base_identity(cmp, base)
    with build_lock(cmp.output):
        state = open_folder(cmp, identity)
    results_path = cmp.output / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else dict(runs={}, references={})

    def save() -> None:
        # Read, merge, write under the folder's lock: comparisons running at once on one folder (each its own
        # candidates, e.g. one per core) keep each other's rows.
        with build_lock(cmp.output):
            if results_path.is_file():
                disk = json.loads(results_path.read_text())
                for key in ("runs", "references"):
                    results[key] = {**disk.get(key, {}), **results[key]}
            results_path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
            state["candidates"] = {**json.loads((cmp.output / "compare.json").read_text())["candidates"],
                                   **state["candidates"]}
            write_report(cmp, state, results)

    teacher = None
    if cmp.teacher == "tuned":
        from sra_distill.train.teacher_tuning import tuned_teacher
        teacher = str(tuned_teacher(base, cmp.tuning or TeacherTuning(), progress=cmp.progress))
        results["teacher"] = teacher
    p = cmp.protocol
    for ref in cmp.references:
        if ref in results["references"]:
            continue
        if ref == "teacher":
            model, tokenizer, arch, layers = teacher or base.teacher, base.teacher_tokenizer, base.teacher_arch, None
        else:  # the student before training, built as training builds it
            model, tokenizer = base.student, base.student_tokenizer
            arch, layers = base.student_arch, base.student_layers
        log(f"[compare] scoring the {'tuned ' if ref == 'teacher' and teacher else ''}{ref} on dev and test")
        started = time.perf_counter()
        folder = cmp.runs / f"reference-{ref}"
        row = dict(dev=score(model, tokenizer, p.dev_sets, p.dev_examples, p.dev_seeds, p, folder / "dev",
                             cmp.progress, arch, layers),
                   test=score(model, tokenizer, p.test_sets, p.test_examples, p.test_seeds, p, folder / "test",
                              cmp.progress, arch, layers))
        row["eval_s"] = time.perf_counter() - started
        results["references"][ref] = row
        save()
    todo = [(c, s) for c in cmp.candidates for s in cmp.seeds if f"{c.name}/{s}" not in results["runs"]]
    log(f"[compare] {len(cmp.candidates)} candidates x {len(cmp.seeds)} seeds: {len(todo)} runs to do, "
        f"{len(cmp.candidates) * len(cmp.seeds) - len(todo)} done; writing {cmp.output / 'compare.md'}")
    sharers = cache_sharers(cmp, base)
    caches: dict[int, Path] = {}
    for index, (cand, seed) in enumerate(todo, 1):
        run_dir = cmp.runs / cand.name / f"seed-{seed}"
        trained = (run_dir / "trained.json").is_file()  # then train_run reads its result: no cache is opened
        cache = None if trained else started_teacher_cache(run_dir)
        if cache is None and not trained and cand in sharers:
            if seed not in caches:
                caches[seed] = seed_teacher_cache(cmp, sharers, seed, teacher, log)
            cache = str(caches[seed])
        log(f"[compare] run {index}/{len(todo)}: {cand.name} seed {seed} ({' '.join(cand.overrides)}): training")
        overrides = run_overrides(cmp, base, cand, seed, run_dir, teacher, cache)
        row = dict(candidate=cand.name, seed=seed, **train_run(cmp, cand, overrides, run_dir))
        log(f"[compare] run {index}/{len(todo)}: {cand.name} seed {seed}: scoring on dev and test")
        started = time.perf_counter()
        row["dev"] = score(str(run_dir / "final"), None, p.dev_sets, p.dev_examples, p.dev_seeds, p,
                           run_dir / "eval-dev", cmp.progress)
        row["test"] = score(str(run_dir / "final"), None, p.test_sets, p.test_examples, p.test_seeds, p,
                            run_dir / "eval-test", cmp.progress)
        row["eval_s"] = time.perf_counter() - started
        results["runs"][f"{cand.name}/{seed}"] = row
        save()
        log(f"[compare] {cand.name} seed {seed}: dev {row['dev']['average']:.2f}, test {row['test']['average']:.2f} "
            f"(train {row['train_s']:.0f} s, eval {row['eval_s']:.0f} s)")
    save()
    return results


# ------------------------------------------------------------------------------------------------ the table

def paired_bootstrap(a: np.ndarray, b: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0):
    """Mean of a - b over examples and its 95% percentile interval, resampling examples with replacement."""
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired_bootstrap: need two score arrays of one non-zero length, got {a.shape}, {b.shape}")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(samples, diff.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


@dataclass
class Row:
    """A candidate's finished runs, summarised."""

    name: str
    overrides: list[str]
    seeds: list[int]
    runs: list[dict]

    def scores(self, split: str) -> list[float]:  # one average per training seed
        return [r[split]["average"] for r in self.runs]

    def set_scores(self, split: str, name: str) -> list[float]:
        return [r[split]["sets"][name]["mean"] for r in self.runs]

    def cell(self, values: list[float], split: str, name: str | None = None) -> str:
        if len(values) > 1:
            return f"{np.mean(values):.2f} ± {np.std(values):.2f}"
        sets = self.runs[0][split]["sets"]  # one training seed: the spread over sampling seeds
        std = sets[name]["std"] if name else max(s["std"] for s in sets.values())
        return f"{values[0]:.2f} ± {std:.2f}*"

    def examples(self, seeds: list[int]) -> np.ndarray:
        """Test ROUGE-L per example (all test sets in order), averaged over the given training seeds."""
        by_seed = {r["seed"]: r for r in self.runs}
        return np.mean([np.concatenate([np.asarray(v) for _, v in sorted(by_seed[s]["test"]["per_example"].items())])
                        for s in seeds], axis=0)


def summarise(state: dict, results: dict) -> list[Row]:
    rows = []
    for name, overrides in state["candidates"].items():
        runs = sorted((r for r in results["runs"].values() if r["candidate"] == name), key=lambda r: r["seed"])
        if runs:
            rows.append(Row(name, overrides, [r["seed"] for r in runs], runs))
    return rows


def versus(row: Row, other: Row) -> str:
    if row is other:
        return "-"
    shared = sorted(set(row.seeds) & set(other.seeds))
    if not shared:
        return "no shared seed"
    diff, low, high = paired_bootstrap(row.examples(shared), other.examples(shared))
    return f"{diff:+.2f} [{low:+.2f}, {high:+.2f}]"


def sft_row(rows: list[Row]) -> Row | None:
    return next((r for r in rows if r.overrides == ["method=sft"]), None) or next(
        (r for r in rows if r.name == "sft"), None)


def _first(count: int | None) -> str:
    return "all examples" if count is None else f"first {count}"


def render(cmp: Comparison, state: dict, results: dict) -> str:
    p = state["base"]["protocol"]
    rows = summarise(state, results)
    test_names = list(p["test_sets"])
    best = max(rows, key=lambda r: np.mean(r.scores("dev"))) if rows else None
    sft = sft_row(rows)
    teacher = state["base"]["teacher"]
    tuning = state["base"]["tuning"]
    teacher_line = (f"tuned on the training data first ({tuning['steps']} steps, lr {tuning['lr']}, the paper's "
                    f"protocol; `{results.get('teacher', 'not built yet')}`)" if teacher == "tuned" else
                    "as given (`--teacher raw`: not tuned by this comparison; the paper's protocol tunes it on the "
                    "training data first)")
    settings = state["base"]["settings"]
    lines = [
        "# Which method for this pair? (`sra compare`)", "",
        f"- Pair: teacher `{settings['teacher']}` -> student `{settings['student']}` (student tokenizer "
        f"`{settings['student_tokenizer']}`); data `{settings['train_data']}`",
        f"- Budget: {settings['max_steps'] or settings['epochs']} {'steps' if settings['max_steps'] else 'epochs'} x "
        f"batch {settings['batch_size']} x max_length {settings['max_length']}; training seeds of each candidate "
        "in its row",
        f"- Teacher: {teacher_line}",
        f"- Dev (selection): {_first(p['dev_examples'])} of "
        f"{', '.join(f'{k} (`{v}`)' for k, v in p['dev_sets'].items())}"
        f", sampling seeds {', '.join(map(str, p['dev_seeds']))}",
        f"- Test (judgement): {_first(p['test_examples'])} of "
        f"{', '.join(f'{k} (`{v}`)' for k, v in p['test_sets'].items())}, sampling seeds "
        f"{', '.join(map(str, p['test_seeds']))}; {p['max_new_tokens']} new tokens; the DSKD/MiniLLM ROUGE-L "
        "(sampling at temperature 1, no-repeat-ngram 6, F1 x100, max over references)",
        "- Scores: mean ± population std over training seeds (`*`: one training seed, std over sampling seeds). "
        "`vs` columns: test difference (this row - that row), paired bootstrap over test examples "
        f"({BOOTSTRAP_SAMPLES} resamples, 95% interval; each example averaged over sampling seeds and the training "
        "seeds both rows share).",
        "",
    ]
    if best is None:
        return "\n".join(lines + ["No run has finished yet.", ""])
    lines += ["| candidate | overrides | seeds | dev | " + " | ".join(f"test {n}" for n in test_names)
              + f" | test avg | vs best on dev ({best.name}) | vs SFT{f' ({sft.name})' if sft else ''} | train "
              "| eval |",
              "|---|---|---|---|" + "---|" * len(test_names) + "---|---|---|---|---|"]
    for name, ref in results["references"].items():
        label = f"{'tuned ' if name == 'teacher' and teacher == 'tuned' else ''}{name} (reference)"
        test_cells = [f"{ref['test']['sets'][n]['mean']:.2f} ± {ref['test']['sets'][n]['std']:.2f}*"
                      for n in test_names]
        lines.append(f"| {label} | - | - | {ref['dev']['average']:.2f} | {' | '.join(test_cells)} | "
                     f"{ref['test']['average']:.2f} | | | - | {ref['eval_s'] / 60:.1f} min |")
    for row in sorted(rows, key=lambda r: -np.mean(r.scores("dev"))):
        tests = [row.cell(row.set_scores("test", n), "test", n) for n in test_names]
        train = np.mean([r["train_s"] for r in row.runs]) / 60
        evals = np.mean([r["eval_s"] for r in row.runs]) / 60
        mark = " **(selected)**" if row is best else ""
        lines.append(f"| {row.name}{mark} | `{' '.join(row.overrides)}` | {', '.join(map(str, row.seeds))} | "
                     f"{row.cell(row.scores('dev'), 'dev')} | {' | '.join(tests)} | "
                     f"{row.cell(row.scores('test'), 'test')} | {versus(row, best)} | "
                     f"{versus(row, sft) if sft else 'no SFT row'} | {train:.1f} min | {evals:.1f} min |")
    lines += ["", f"Selected on dev: **{best.name}** (dev {np.mean(best.scores('dev')):.2f}); its test average "
              f"{np.mean(best.scores('test')):.2f}. Train and eval are wall time per run on this machine."]
    if "teacher" in results["references"] and sft:
        gap = results["references"]["teacher"]["dev"]["average"] - np.mean(sft.scores("dev"))
        lines.append(f"Teacher dev score minus the SFT student's: {gap:+.2f} (a teacher that does not lead its SFT "
                     "student teaches the task little beyond the references).")
    return "\n".join(lines) + "\n"


def plot(cmp: Comparison, state: dict, results: dict, path: Path) -> Path | None:
    rows = summarise(state, results)
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: np.mean(r.scores("test")))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    y = np.arange(len(rows))
    for offset, split, colour in ((-0.18, "dev", "tab:gray"), (0.18, "test", "tab:blue")):
        means = [np.mean(r.scores(split)) for r in rows]
        stds = [np.std(r.scores(split)) for r in rows]
        ax.barh(y + offset, means, height=0.34, xerr=stds, color=colour, label=f"{split} ROUGE-L", capsize=3)
    for name, ref in results["references"].items():
        ax.axvline(ref["test"]["average"], linestyle="--", color="tab:red" if name == "teacher" else "black",
                   label=f"{name} (test)")
    ax.set_yticks(y, [f"{r.name} ({len(r.seeds)} seed{'s' if len(r.seeds) > 1 else ''})" for r in rows])
    ax.set_xlabel("ROUGE-L (mean ± std over training seeds)")
    # Beside the axes: inside, it hid the shortest bars' ends and error bars.
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(cmp: Comparison, state: dict, results: dict) -> None:
    (cmp.output / "compare.md").write_text(render(cmp, state, results), encoding="utf-8")
    plot(cmp, state, results, cmp.output / "compare.png")


# ------------------------------------------------------------------------------------------------ CLI

def comparison_from_args(args) -> Comparison:
    from sra_distill.evaluation.evaluate import parse_eval_sets, parse_seeds

    candidates = [Candidate.parse(n) for n in (args.candidates or "").split(",") if n.strip()]
    candidates += [Candidate.parse(text) for text in args.candidate]

    def sets(entries, default):
        if not entries:
            return dict(default)
        return {name: str(path) for name, path in parse_eval_sets(entries, None).items()}

    test = ({name: str(path) for name, path in parse_eval_sets(args.test, [args.test_suite]).items()}
            if args.test_suite else sets(args.test, DEFAULT_TEST))
    if args.tune_steps < 1 or args.tune_lr <= 0:
        raise ConfigError("--tune-steps must be >= 1 and --tune-lr > 0")
    references = tuple(r.strip() for r in args.references.split(",") if r.strip() and r.strip() != "none")
    unknown = [r for r in references if r not in ("teacher", "student")]
    if unknown:
        raise ConfigError(f"--references: unknown row(s) {', '.join(unknown)}; choose teacher, student or none")
    return Comparison(
        output=Path(args.output), candidates=candidates,
        config=str(resolve_config(args.config)) if args.config else None, overrides=list(args.overrides),
        seeds=tuple(parse_seeds(args.seeds)),
        protocol=Protocol(dev_sets=sets(args.dev, DEFAULT_DEV), dev_examples=args.dev_examples,
                          dev_seeds=tuple(parse_seeds(args.dev_seeds)), test_sets=test,
                          test_examples=args.test_examples, test_seeds=tuple(parse_seeds(args.test_seeds)),
                          max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size),
        teacher=args.teacher, tuning=TeacherTuning(steps=args.tune_steps, lr=args.tune_lr,
                                                  warmup_steps=max(0, args.tune_steps // 10)),
        references=references, teacher_cache=not args.no_teacher_cache, progress=not args.no_progress,
        runs_dir=Path(args.runs_dir) if args.runs_dir else None, keep_checkpoints=args.keep_checkpoints,
    )


def run_compare(args) -> int:
    cmp = comparison_from_args(args)
    if args.report_only:
        state_path, results_path = cmp.output / "compare.json", cmp.output / "results.json"
        if not state_path.is_file():
            raise ConfigError(f"--output {cmp.output}: no comparison there (no compare.json)")
        results = json.loads(results_path.read_text()) if results_path.is_file() else dict(runs={}, references={})
        write_report(cmp, json.loads(state_path.read_text()), results)
    else:
        run_comparison(cmp)
    print((cmp.output / "compare.md").read_text(encoding="utf-8"), end="")
    print(f"wrote {cmp.output / 'compare.md'} and {cmp.output / 'compare.png'}")
    return 0
