"""Where shared data lives and where caches go: one setting each, read from the environment."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from sra_distill.errors import NotFoundError

_REPO_ROOT = Path(__file__).resolve().parents[2]
# Only a source checkout has its data beside it; an installed package's parents are site-packages and the venv.
_CHECKOUT = _REPO_ROOT if (_REPO_ROOT / "pyproject.toml").is_file() else None
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # the packaged settings files: `--config tiny`


def data_root() -> Path:
    """The data root: `$SRA_DATA_ROOT`, else `../shared/data` beside the checkout (or beside the working directory)."""
    env = os.environ.get("SRA_DATA_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    bases = [b for b in (_CHECKOUT, Path.cwd()) if b is not None]
    for base in bases:
        candidate = (base.parent / "shared" / "data").resolve()
        if candidate.is_dir():
            return candidate
    return (bases[0].parent / "shared" / "data").resolve()


def data_root_note() -> str:
    """Where the data root came from, for every "not found" message about data: the user's next step is to set or
    fix `SRA_DATA_ROOT`."""
    env = os.environ.get("SRA_DATA_ROOT")
    if env:
        return f"SRA_DATA_ROOT={env}"
    return (f"SRA_DATA_ROOT is unset, so the default {data_root()} is used; "
            f"set SRA_DATA_ROOT to the folder holding dolly/ and tokenizers/")


def config_names() -> list[str]:
    """Names of the packaged settings files (`tiny`, `demo`, `recommended`, ...)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def resolve_config(config: str | os.PathLike) -> Path:
    """A `--config` value: a YAML file as given, else a packaged settings file by name (`tiny` or `tiny.yaml`)."""
    path = Path(config).expanduser()
    if path.is_file():
        return path
    packaged = CONFIGS_DIR / f"{path.stem}.yaml"
    # `configs/tiny.yaml` is what the checkout used to hold: it names the packaged file too.
    if path.parent in (Path("."), Path("configs")) and packaged.is_file():
        return packaged
    raise NotFoundError(f"config {config}: no such file, nor a packaged config name ({', '.join(config_names())})")


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


@contextlib.contextmanager
def build_lock(folder: Path):
    """Hold an exclusive lock (the file `<folder>.lock` beside it) while building a folder that processes share:
    one built once under the cache (a teacher cache, a tuned teacher) or a comparison's files. A process that
    finds it held waits; the lock goes with the process, so a killed builder leaves none behind."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
