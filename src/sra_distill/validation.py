"""Settings checked before anything loads: ranges, names, the output folder, where models, tokenizers and data come
from, and hub access.

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

from sra_distill.config import Config, ConfigError, method_sections
from sra_distill.paths import data_root, data_root_note, resolve_data_path

PRECISIONS = ("no", "bf16", "fp16")  # accelerate's mixed precision for the student
TEACHER_PRECISIONS = ("fp32", "bf16", "fp16")  # the keys of models.DTYPES
RANDOM_ARCHS = ("gpt2", "llama")  # models.random_model
FILE_SUFFIXES = (".jsonl", ".json", ".gz", ".txt", ".csv", ".parquet")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name


def _at_least(cfg: Config, key: str, low: float, inclusive: bool = True, when_set: bool = False) -> None:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    if value is None and when_set:
        return
    if value is None or (value < low if inclusive else value <= low):
        relation = ">=" if inclusive else ">"
        raise ConfigError(f"{key}: must be {relation} {low:g}, got {value!r}")


def _within(cfg: Config, key: str, low: float, high: float) -> None:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    if not low <= value <= high:
        raise ConfigError(f"{key}: must be in [{low:g}, {high:g}], got {value!r}")


def _one_of(key: str, value: str, names) -> None:
    if value not in names:
        raise ConfigError(f"{key}: expected one of {', '.join(names)}, got {value!r}")


def check_ranges(cfg: Config) -> None:
    """Numeric ranges and names; each message names its key."""
    _one_of("method", cfg.method, tuple(method_sections()))
    _one_of("precision", cfg.precision, PRECISIONS)
    _one_of("teacher_precision", cfg.teacher_precision, TEACHER_PRECISIONS)
    _at_least(cfg, "lr", 0, inclusive=False)
    section = method_sections()[cfg.method]
    if hasattr(getattr(cfg.methods, section), "projector_lr"):
        _at_least(cfg, f"methods.{section}.projector_lr", 0, inclusive=False)
    _within(cfg, "alpha", 0.0, 1.0)
    for key in ("batch_size", "grad_accum", "log_every", "epochs", "max_bad_steps", "eval_examples",
                "eval_max_new_tokens"):
        _at_least(cfg, key, 1)
    _at_least(cfg, "max_steps", 1, when_set=True)
    _at_least(cfg, "max_train_examples", 1, when_set=True)
    for key in ("weight_decay", "warmup_steps", "max_grad_norm", "save_every", "keep_last", "eval_every",
                "num_workers"):
        _at_least(cfg, key, 0)
    _within(cfg, "min_lr_ratio", 0.0, 1.0)
    if not 1 <= cfg.max_prompt_length < cfg.max_length:
        raise ConfigError(f"max_prompt_length: need 1 <= max_prompt_length < max_length (room for a response), got "
                          f"max_prompt_length={cfg.max_prompt_length}, max_length={cfg.max_length}")
    if cfg.lora.enabled:
        _at_least(cfg, "lora.r", 1)
        _at_least(cfg, "lora.alpha", 0, inclusive=False)
        if not 0 <= cfg.lora.dropout < 1:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {cfg.lora.dropout!r}")
        if cfg.student.startswith("random:") and not cfg.lora.merge_on_save:
            raise ConfigError(
                f"lora.merge_on_save=false with student={cfg.student}: the adapter would be saved without a base "
                f"model anyone can load it onto (a random student exists only inside this run); set "
                f"lora.merge_on_save=true to save the merged student"
            )


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
    from sra_distill.models.sources import PACKAGED_MODELS

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
    from sra_distill.data.tokenization import KNOWN_TOKENIZERS

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
    """Every check of this module, in the order a user would fix them; then offline mode unless allow_download."""
    check_ranges(cfg)
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
