"""Keeping runs apart in an output_dir: a lock, fresh-versus-resume rules, settings fingerprints, checkpoint manifests,
and stopping on a signal with a checkpoint.

* `RunLock`: `output_dir/.lock` holds the owner (pid, host, start time) and an advisory `flock` that the kernel
  drops when the process ends however it ends, so a crashed run never leaves the folder stuck: a lock file whose
  `flock` is free is stale and is taken over with a warning; a held one stops the second run at once.
* `run_artifacts` / `clear_run`: what an earlier run left (checkpoints, metrics, final/, best/); a fresh run refuses
  a folder that holds any of it unless `overwrite=true`, which removes exactly those files.
* `fingerprint` / `compare_fingerprints`: the settings that shape the training trajectory, written into every
  checkpoint; a resume with any of them changed is refused, naming each key with its old and new value.
* `intact_checkpoints`: a resume checks the newest checkpoint against its manifest (`run_files.verify_manifest`) and
  falls back to the previous intact one, naming the bad file.

All of it runs before any model loads.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sra_distill.config import Config, config_to_dict, method_sections
from sra_distill.errors import RunFolderError
from sra_distill.fields import resume_safe_keys
from sra_distill.run_files import list_step_folders, skipped_checkpoint_warning, verify_manifest

LOCK_NAME = ".lock"
FINGERPRINT_NAME = "fingerprint.json"

# Files and folders a run writes into its output_dir (what `overwrite=true` removes, and nothing else).
RUN_ARTIFACTS = (
    "checkpoints", "metrics.jsonl", "final", "best", "final.tmp", "final.old", "best.tmp", "best.old",
    "loss_curves.png", "data_report.json", "config.yaml",
)
# Their subset that means "an earlier run trained here" (config.yaml and data_report.json alone are written before
# the first step, so a run that failed at its start does not block the next one).
TRAINED_ARTIFACTS = ("checkpoints", "metrics.jsonl", "final", "best")
# What a run leaves when it stops before its first checkpoint and before it finishes.
UNFINISHED_RUN_ARTIFACTS = frozenset({"metrics.jsonl", "best"})

# Settings that may change when a run resumes are declared `resume_safe` where they are declared (`fields.setting`);
# every other setting is part of the fingerprint. Changing the length (max_steps / epochs) stretches the
# learning-rate schedule from the resumed step on, which is what extending means.


# ------------------------------------------------------------------------------------------------------------ lock
@dataclass
class LockOwner:
    pid: int
    host: str
    started: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}"


class RunLock:
    """An exclusive claim on an output_dir for the life of one run (see the module docstring)."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self._handle = None

    @staticmethod
    def _read_owner(path: Path) -> LockOwner | None:
        try:
            data = json.loads(path.read_text())
            return LockOwner(int(data["pid"]), str(data["host"]), str(data["started"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                owner = self._read_owner(self.path)
                holder = owner.describe() if owner else "another process"
                raise RunFolderError(
                    f"output_dir {self.path.parent} is in use by a running `sra distill` ({holder}; lock file "
                    f"{self.path}); wait for it to finish or choose another output_dir"
                ) from None
            # The owner may have released (unlinked) the file between our open and our flock: then this flock is
            # on a file nobody else will see; start again on the current one.
            try:
                same_file = os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            handle.close()
        previous = self._read_owner(self.path)
        if previous is not None:  # the file outlived its owner: the flock died with it
            print(f"warning: output_dir {self.path.parent} had a stale lock from a run that ended without releasing "
                  f"it ({previous.describe()}); taking it over", file=sys.stderr, flush=True)
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())}
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(owner) + "\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        """Remove the lock file, then drop the flock (a run starting in between finds no file, or a free flock)."""
        if self._handle is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            self._handle.close()  # closing drops the flock
            self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None


# ----------------------------------------------------------------------------------------------- fresh vs resume
def run_artifacts(output_dir: Path) -> dict[str, str]:
    """The trained-run artefacts present in output_dir: name -> how to show it (an empty checkpoints/ does not
    count)."""
    out = Path(output_dir)
    found = {}
    for name in TRAINED_ARTIFACTS:
        path = out / name
        if name == "checkpoints":
            steps = [f"step-{step}" for step, _ in list_step_folders(out)]
            if steps:
                found[name] = f"checkpoints/ ({', '.join(steps)})"
        elif path.exists():
            found[name] = name + ("/" if path.is_dir() else "")
    return found


def clear_run(output_dir: Path) -> list[str]:
    """Remove what a run writes into output_dir (RUN_ARTIFACTS); other files stay. Returns what was removed."""
    out = Path(output_dir)
    removed = []
    for name in RUN_ARTIFACTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            removed.append(name)
        elif path.exists() or path.is_symlink():
            path.unlink()
            removed.append(name)
    return removed


def remove_if_empty(folder: Path) -> None:
    """Remove a folder a failed run created and wrote nothing into; a folder holding anything stays."""
    try:
        folder.rmdir()
    except OSError:  # not empty, already gone, or not ours to remove
        pass


def _refusal(out: Path, present: dict[str, str], resume: bool) -> RunFolderError:
    """Why a run may not start in an output_dir that holds an earlier run without an intact checkpoint."""
    shown = ", ".join(present.values())
    if "final" in present and "checkpoints" not in present:  # finished with save_every=0: nothing to continue from
        return RunFolderError(
            f"output_dir {out} holds a finished run ({shown}) without checkpoints, so it cannot be continued; start "
            f"over with overwrite=true (deletes those) or choose another output_dir"
        )
    if not resume:
        return RunFolderError(
            f"output_dir {out} already holds a run ({shown}); continue it with resume=true, start over "
            f"with overwrite=true (deletes those), or choose another output_dir"
        )
    return RunFolderError(
        f"resume=true found no intact checkpoint in {out}, but it holds {shown} from an earlier run; "
        f"start over with overwrite=true (deletes those) or choose another output_dir"
    )


# ----------------------------------------------------------------------------------------------------- fingerprint
def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: tree}


def fingerprint(cfg: Config, processes: int) -> dict[str, Any]:
    """Flat `{dotted key: value}` of every setting that shapes the trajectory, plus the process count (which sets the
    global batch and the RNG states saved per process). Of `methods`, only the section the method reads counts."""
    tree = config_to_dict(cfg)
    methods = tree.pop("methods", {}) or {}
    section = method_sections().get(cfg.method)
    safe = resume_safe_keys(cfg)
    flat = _flatten(tree)
    if section is not None and methods.get(section) is not None:
        flat.update(_flatten(methods[section], f"methods.{section}"))
    flat = {key: value for key, value in flat.items() if key not in safe}
    flat["processes"] = processes
    return flat


def compare_fingerprints(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every fingerprinted setting whose value differs. A key only one side knows (a setting
    added or removed between versions) is compared only when the other side has it."""
    return [(key, old[key], new[key]) for key in sorted(old.keys() & new.keys()) if old[key] != new[key]]


def safe_changes(old_config: dict[str, Any], cfg: Config) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for the resume-safe settings that differ from the checkpoint's config.yaml."""
    new = _flatten(config_to_dict(cfg))
    old = _flatten(old_config)
    safe = resume_safe_keys(cfg) - {"resume", "overwrite"}
    return [(key, old[key], new[key]) for key in sorted(old.keys() & new.keys() & safe) if old[key] != new[key]]


def write_fingerprint(checkpoint: Path, cfg: Config, processes: int) -> None:
    (Path(checkpoint) / FINGERPRINT_NAME).write_text(json.dumps(fingerprint(cfg, processes), indent=1, default=str))


def intact_checkpoints(output_dir: Path, warn=None) -> list[tuple[int, Path]]:
    """The checkpoints whose manifest verifies, newest first. Checking stops at the first intact one (older ones are
    returned unchecked after it, as fallbacks); every bad one on the way is reported through `warn`."""
    warn = warn or (lambda message: print(message, file=sys.stderr, flush=True))
    candidates = list_step_folders(output_dir)[::-1]
    for index, (step, path) in enumerate(candidates):
        problem = verify_manifest(path)
        if problem is None:
            return candidates[index:]
        warn(skipped_checkpoint_warning(path, problem))
    return []


# ------------------------------------------------------------------------------------------------ claiming a folder
@dataclass
class Claim:
    """What `claim_output_dir` decided: the lock (main process only) and the checkpoints to resume from (newest
    first; empty for a fresh run)."""

    lock: RunLock | None
    checkpoints: list[tuple[int, Path]]

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def claim_output_dir(cfg: Config, processes: int, main_process: bool, warn=None) -> Claim:
    """Lock output_dir (main process), then apply the fresh / resume rules of the module docstring. Raises
    `RunFolderError` (with the lock released) when the run must not start."""
    if warn is None:  # every process runs the checks; one of them speaks
        def warn(message: str) -> None:
            if main_process:
                print(message, file=sys.stderr, flush=True)
    out = Path(cfg.output_dir)
    lock = RunLock(out) if main_process else None
    if lock is not None:
        lock.acquire()
    try:
        if cfg.resume and cfg.overwrite:
            raise RunFolderError("resume=true and overwrite=true contradict each other: resume continues the run in "
                                 "output_dir, overwrite deletes it; set one of them")
        checkpoints: list[tuple[int, Path]] = []
        if cfg.resume:
            checkpoints = intact_checkpoints(out, warn)
            if checkpoints:
                check_resume_settings(checkpoints[0][1], cfg, processes, main_process)
        if not checkpoints:
            present = run_artifacts(out)
            # resume=true in a folder whose run stopped before its first checkpoint (a preempted job resubmitted):
            # its metrics and best/ belong to steps that will be trained again, so they go.
            unfinished = cfg.resume and set(present) <= UNFINISHED_RUN_ARTIFACTS
            if present and not (cfg.overwrite or unfinished):
                raise _refusal(out, present, cfg.resume)
            if present and main_process:
                removed = clear_run(out)
                why = "overwrite=true" if cfg.overwrite else "resume=true found no checkpoint"
                print(f"{why}: removed {', '.join(removed)} from {out}", flush=True)
            if cfg.resume and main_process:  # said only once the fresh start is certain
                print(f"resume=true: no complete checkpoint in {out / 'checkpoints'}; starting a fresh run", flush=True)
        return Claim(lock, checkpoints)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def check_resume_settings(checkpoint: Path, cfg: Config, processes: int, main_process: bool) -> None:
    """Refuse a resume whose trajectory settings differ from the checkpoint's; log the resume-safe changes."""
    stored = Path(checkpoint) / FINGERPRINT_NAME
    if not stored.is_file():
        if main_process:
            print(f"warning: checkpoint {checkpoint} has no {FINGERPRINT_NAME} (written by an older version); "
                  f"its settings cannot be compared with this run's", file=sys.stderr, flush=True)
        return
    old = json.loads(stored.read_text())
    changed = compare_fingerprints(old, json.loads(json.dumps(fingerprint(cfg, processes), default=str)))
    if changed:
        listing = "; ".join(f"{key}: {old_value!r} -> {new_value!r}" for key, old_value, new_value in changed)
        raise RunFolderError(
            f"resume=true: these settings differ from the checkpoint {checkpoint} and would change the run's "
            f"trajectory: {listing}. Resume with the checkpoint's settings (its config.yaml), or start a new run "
            f"in another output_dir (or overwrite=true)"
        )
    config_file = Path(checkpoint) / "config.yaml"
    if main_process and config_file.is_file():
        for key, old_value, new_value in safe_changes(yaml.safe_load(config_file.read_text()) or {}, cfg):
            print(f"resume: {key} changed {old_value!r} -> {new_value!r} (allowed)", flush=True)


# -------------------------------------------------------------------------------------------------------- stopping
class StopSignals:
    """While installed, SIGINT and SIGTERM only set `signum`, which the training loop reads between steps (so the
    current step finishes and is saved). A second SIGINT raises KeyboardInterrupt at once (abort without saving)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: the user wants out now
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after the current step and saving a checkpoint "
              f"(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def resume_command(cfg: Config) -> str:
    """The command line that continues a run from its output_dir (its config.yaml holds every setting)."""
    extra = " overwrite=false" if cfg.overwrite else ""
    return f"sra distill --config {shlex.quote(str(Path(cfg.output_dir) / 'config.yaml'))} resume=true{extra}"
