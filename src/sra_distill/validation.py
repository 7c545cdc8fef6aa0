"""Settings checked before anything loads: every setting's own rules (declared with it: `fields.py`), the rules across
sections, the output folder, where models, tokenizers and data come from, and hub access.

`validate_settings(cfg)` raises a `ConfigError` naming the key for the first bad setting, so a mistake costs a second,
not a model load. Without `allow_download` the hub is switched to offline mode inside the process, so a hub id that
is not cached fails at once with a message that names `allow_download`, instead of retrying HTTP requests.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

from sra_distill.config import Config, ConfigError, method_settings
from sra_distill.data.tokenization import KNOWN_TOKENIZERS
from sra_distill.fields import check_tree
from sra_distill.models.sources import PACKAGED_MODELS
from sra_distill.paths import data_root, data_root_note, resolve_data_path

RANDOM_ARCHS = ("gpt2", "llama")  # models.load.random_model
FILE_SUFFIXES = (".jsonl", ".json", ".gz", ".txt", ".csv", ".parquet")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name


def _one_of(key: str, value: str, names) -> None:
    if value not in names:
        raise ConfigError(f"{key}: expected one of {', '.join(names)}, got {value!r}")


def check_combinations(cfg: Config) -> None:
    """Rules across sections (each setting's own range is checked by the dataclass declaring it, `fields.py`)."""
    if cfg.lora.enabled and cfg.student.startswith("random:") and not cfg.lora.merge_on_save:
        raise ConfigError(
            f"lora.merge_on_save=false with student={cfg.student}: the adapter would be saved without a base "
            f"model anyone can load it onto (a random student exists only inside this run); set "
            f"lora.merge_on_save=true to save the merged student"
        )
    if cfg.on_policy.ratio > 0 and not method_settings(cfg).uses_teacher:
        raise ConfigError(f"on_policy.ratio={cfg.on_policy.ratio} with method={cfg.method}: on-policy training "
                          f"needs a teacher to score the student's answers; use a distillation method")
    if cfg.balance == "gradmag" and not method_settings(cfg).uses_teacher:
        raise ConfigError(f"balance=gradmag with method={cfg.method}: it has no distillation term to balance the CE "
                          f"against; use balance=alpha")
    if cfg.on_policy.ratio > 0 and cfg.teacher_cache:
        raise ConfigError("teacher_cache with on_policy.ratio > 0: on-policy steps need the live teacher on the "
                          "student's own answers, which no cache holds; drop one of the two")
    for side, source, arch in (("teacher", cfg.teacher, cfg.teacher_arch), ("student", cfg.student, cfg.student_arch)):
        # Llama's rotary embedding rotates pairs of a head's dimensions (transformers refuses an odd head_dim).
        if source == "random:llama" and (arch.hidden_size // arch.num_heads) % 2:
            raise ConfigError(f"{side}_arch.num_heads: random:llama needs an even head size hidden_size / num_heads, "
                              f"got {arch.hidden_size} / {arch.num_heads} = {arch.hidden_size // arch.num_heads}")


def warn_long_warmup(warmup_steps: int, total_steps: int) -> None:
    """The engine calls this once it knows the run's length."""
    print(f"warning: warmup_steps={warmup_steps} exceeds the run's {total_steps} steps; the learning rate never "
          f"reaches its peak", file=sys.stderr, flush=True)


def check_output_dir(path: str | os.PathLike) -> None:
    """output_dir must be a folder we can write (or creatable in one)."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} exists and is not a folder")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"output_dir: {out} cannot be created, {probe} is not a folder")
    try:  # a real write: permission bits say nothing for root, read-only mounts or ACLs
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        where = "it" if probe == out else f"its parent {probe}"
        raise ConfigError(f"output_dir: {out} is not writable ({where} refuses a new file: {exc.strerror})") from None


def looks_like_file(path: str) -> bool:
    """A setting meant as a file path rather than a hub / datasets name."""
    return path.startswith((".", "/", "~")) or path.endswith(FILE_SUFFIXES) or "\\" in path


def check_data_path(key: str, path: str, allow_download: bool) -> None:
    """A data setting must name an existing file, or (only with allow_download) a datasets name."""
    resolved = resolve_data_path(path)
    if resolved.is_file() or Path(path).expanduser().is_dir():  # a jsonl file, or a local datasets folder
        return
    if looks_like_file(path):
        tried = [str(Path(path).expanduser())]
        if not Path(path).expanduser().is_absolute():
            tried.append(str(data_root() / path))
        raise ConfigError(f"{key}: file not found: {path} (looked for {' and '.join(dict.fromkeys(tried))}; "
                          f"{data_root_note()})")
    if not allow_download:
        raise ConfigError(
            f"{key}: {path!r} is not a local file (looked in the working directory and the data root "
            f"{data_root()}; {data_root_note()}); loading it as a hub dataset needs allow_download=true"
        )


def _hub_cached(repo_id: str, filenames: tuple[str, ...]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in filenames)
    except Exception:  # not a valid repo id, no cache folder: not cached
        return False


def check_model_source(key: str, source: str, allow_download: bool) -> None:
    """`teacher` / `student`: random:<arch>, a packaged name, a local folder or .gguf file, or a hub id (cached, or
    allow_download)."""
    if source.startswith("random:"):
        _one_of(key, source, [f"random:{arch}" for arch in RANDOM_ARCHS])
        return
    if source.startswith("from:"):  # a model re-tokenised by sra_distill.models.student: check the model it is built from
        if not source[len("from:"):] or source[len("from:"):].startswith(("from:", "random:")):
            raise ConfigError(f"{key}: {source!r}: from: takes a packaged model name, a folder or a .gguf file")
        check_model_source(key, source[len("from:"):], allow_download)
        return
    if source in PACKAGED_MODELS:
        return
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ConfigError(f"{key}: folder {path} has no config.json (expected a save_pretrained folder)")
        return
    if looks_like_file(source) or path.suffix == ".gguf":
        raise ConfigError(f"{key}: file not found: {source}")
    # Other forms (a bare hub id, or a name a newer loader knows) go to the loader, which runs offline.
    if HUB_ID.match(source) and not allow_download and not _hub_cached(source, ("config.json",)):
        known = ", ".join(PACKAGED_MODELS)
        raise ConfigError(
            f"{key}: {source!r} is not a local folder or file, a packaged model ({known}) or random:<arch>, and "
            f"not in the local hub cache; downloading it from the hub needs allow_download=true"
        )


def check_tokenizer_source(key: str, name: str | None, allow_download: bool) -> None:
    if name is None or name in KNOWN_TOKENIZERS:
        return
    path = Path(name).expanduser()
    if path.exists():
        return
    if looks_like_file(name):
        raise ConfigError(f"{key}: file not found: {name}")
    if HUB_ID.match(name) and not allow_download and not _hub_cached(name, ("tokenizer.json", "tokenizer_config.json")):
        raise ConfigError(
            f"{key}: {name!r} is not a known tokenizer ({', '.join(sorted(KNOWN_TOKENIZERS))}), a local folder, or "
            f"in the local hub cache; downloading it needs allow_download=true"
        )


def set_hub_offline() -> None:
    """Offline mode for huggingface_hub, transformers and datasets in this process (and its children): no request
    leaves the machine; what is not cached fails at once."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import huggingface_hub.constants as hub_constants  # read at import; set it too when already imported

    hub_constants.HF_HUB_OFFLINE = True


def validate_settings(cfg: Config) -> None:
    """Every setting's own rules (again: `cfg` may have changed since it was built), then every check of this module,
    in the order a user would fix them; then offline mode unless allow_download."""
    check_tree(cfg)
    check_combinations(cfg)
    check_output_dir(cfg.output_dir)
    check_data_path("train_data", cfg.train_data, cfg.allow_download)
    if cfg.dev_data and cfg.eval_every:
        check_data_path("dev_data", cfg.dev_data, cfg.allow_download)
    check_model_source("teacher", cfg.teacher, cfg.allow_download)
    check_model_source("student", cfg.student, cfg.allow_download)
    check_tokenizer_source("teacher_tokenizer", cfg.teacher_tokenizer, cfg.allow_download)
    check_tokenizer_source("student_tokenizer", cfg.student_tokenizer, cfg.allow_download)
    if cfg.student.startswith("from:") and not cfg.student_tokenizer:
        raise ConfigError(f"student_tokenizer: student {cfg.student!r} is built for a tokenizer; name it "
                          f"(e.g. student_tokenizer=llama2)")
    if cfg.student_layers is not None and not cfg.student.startswith("from:"):
        raise ConfigError(f"student_layers: applies only to a student built with from:MODEL, not {cfg.student!r}")
    if (cfg.demo_eval_seeds or cfg.demo_prompt) and cfg.dev_data and cfg.demo_eval_seeds:
        check_data_path("dev_data", cfg.dev_data, cfg.allow_download)
    if cfg.teacher_adapter and not Path(cfg.teacher_adapter).expanduser().is_dir():
        raise ConfigError(f"teacher_adapter: folder not found: {cfg.teacher_adapter}")
    if not cfg.allow_download:
        set_hub_offline()
