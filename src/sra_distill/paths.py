"""Where shared data lives and where caches go: one setting each, read from the environment."""

from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]


def data_root() -> Path:
    """The data root: `$SRA_DATA_ROOT`, else `../shared/data` beside the checkout (or beside the working directory)."""
    env = os.environ.get("SRA_DATA_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    for base in (_REPO_ROOT, Path.cwd()):
        candidate = (base.parent / "shared" / "data").resolve()
        if candidate.is_dir():
            return candidate
    return (_REPO_ROOT.parent / "shared" / "data").resolve()


def cache_dir() -> Path:
    """Cache for derived artefacts (shared vocabularies, converted teachers): `$SRA_CACHE`, else ~/.cache/sra_distill."""
    root = Path(os.environ.get("SRA_CACHE", Path.home() / ".cache" / "sra_distill")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def resolve_data_path(path: str | os.PathLike) -> Path:
    """A path as given if it exists, else relative to the data root (so configs can say `dolly/train.jsonl`)."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    return data_root() / p
