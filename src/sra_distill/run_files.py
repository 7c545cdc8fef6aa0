"""The files of a run folder, read and written without loading the engine: `metrics.jsonl`, `checkpoints/step-N/`,
and folders replaced so that a kill at any moment leaves a complete one.

* `read_metric_rows` / `append_metric_row` / `keep_metric_rows_until`: the per-step rows (a last line cut short by
  a kill mid-write is dropped when read).
* `list_step_folders` / `list_checkpoints`: every `checkpoints/step-N` folder, and the complete ones.
* `write_manifest` / `verify_manifest` / `skipped_checkpoint_warning`: what makes a checkpoint complete and intact.
* `checkpoint_folders` / `publish_checkpoint`: a checkpoint is written under a temporary name, then renamed.
* `remove_dir` / `replace_dir`: delete or swap a folder by renames first, so a half-done one never has the real name.

A checkpoint is COMPLETE when its `manifest.json` is there: the manifest lists every file's size and SHA-256 and is
written last, so a save killed earlier leaves no manifest. It is INTACT when every file still matches the manifest
(`verify_manifest`); a resume uses the newest intact one and names each one it skips (`skipped_checkpoint_warning`).

The engine (`engine.py`), the lock and resume rules (`runfolder.py`), `sra report`, the plots and the model cards
all read a run through this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
TRAINER_STATE_NAME = "trainer_state.json"  # the run's position, written into every checkpoint
MANIFEST_NAME = "manifest.json"  # written last into every checkpoint; its presence marks a complete one
METRICS_NAME = "metrics.jsonl"


# ---------------------------------------------------------------------------------------------------- metrics
def read_metric_rows(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl; a last line cut short by a kill mid-write is dropped (any other bad line raises)."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    rows = []
    for index, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if index < len(lines) - 1:
                raise
    return rows


def append_metric_row(path: Path, row: dict) -> None:
    with Path(path).open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def keep_metric_rows_until(path: Path, step: int) -> None:
    """Drop the rows logged after `step` (a resumed run continues from there, so the file reads like one run)."""
    rows = read_metric_rows(path)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))


# ------------------------------------------------------------------------------------------------ checkpoints
def list_step_folders(output_dir: Path) -> list[tuple[int, Path]]:
    """Every `checkpoints/step-N` folder (complete or not), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir())


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a manifest; temporary directories of an interrupted save are ignored),
    oldest first. Their files are not checked here: `verify_manifest` does."""
    return [(step, path) for step, path in list_step_folders(output_dir) if (path / MANIFEST_NAME).is_file()]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> Path:
    """manifest.json: every file under `folder` (relative path -> size, sha256). Write it after everything else: it
    marks the checkpoint complete."""
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    target = folder / MANIFEST_NAME
    tmp = folder / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1))
    os.replace(tmp, target)
    return target


def verify_manifest(folder: Path) -> str | None:
    """None when the checkpoint is intact (every file the manifest lists is there with its size and checksum);
    else what is wrong, naming the file."""
    folder = Path(folder)
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        return f"{manifest} is missing (an incomplete checkpoint, or one written before manifests existed)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"{manifest} is unreadable ({exc})"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{path} has {size} bytes, the manifest says {expected['size']}"
        if _sha256(path) != expected["sha256"]:
            return f"{path} does not match its checksum in the manifest"
    return None


def skipped_checkpoint_warning(path: Path, problem: str) -> str:
    """The warning for a checkpoint a resume passes over, with what is wrong with it."""
    return f"warning: checkpoint {path} is corrupt or incomplete and is skipped: {problem}"


def checkpoint_folders(output_dir: Path, step: int, main_process: bool) -> tuple[Path, Path]:
    """(temporary folder to write step `step`'s checkpoint into, its final name). The main process clears what a
    killed save or delete left and creates the temporary folder."""
    root = Path(output_dir) / "checkpoints"
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    if main_process:
        for stale in [*root.glob(".tmp-step-*"), *root.glob(".del-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    return tmp, final


def publish_checkpoint(tmp: Path, final: Path, keep_last: int) -> None:
    """Give a fully written checkpoint its name (it exists only once complete), then prune to the newest
    `keep_last` (0 keeps every checkpoint)."""
    if final.exists():
        remove_dir(final)
    tmp.rename(final)
    if keep_last > 0:
        for _, old in list_checkpoints(final.parent.parent)[:-keep_last]:
            remove_dir(old)


# ---------------------------------------------------------------------------------------------------- folders
def remove_dir(path: Path) -> None:
    """Delete a directory so that a kill mid-way never leaves a half-deleted one under its name: rename, then delete."""
    doomed = path.with_name(f".del-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def replace_dir(written: Path, target: Path) -> None:
    """Put the folder `written` in place of `target`, moving the old copy aside first: a kill at any moment leaves
    a complete folder under `target` (or its `.old` copy)."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    written.rename(target)
    shutil.rmtree(old, ignore_errors=True)
