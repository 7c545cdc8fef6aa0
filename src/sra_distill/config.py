"""Typed, documented settings: one dataclass tree, YAML on disk, `key=value` overrides (dots for nested keys).

Every setting is documented where it is declared, with its range or names and whether it may change on resume
(`fields.setting`). Unknown keys (with the nearest known key), values of the wrong type and values out of range are
rejected with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sra_distill.errors import ConfigError
from sra_distill.fields import SettingError, Settings, setting
from sra_distill.losses.alm import ALMConfig
from sra_distill.losses.base import MethodConfig
from sra_distill.losses.divergences import DivergenceConfig
from sra_distill.losses.dskd import DSKDConfig
from sra_distill.losses.mined import MinEDConfig
from sra_distill.losses.multilevel_ot import MultiLevelOTConfig
from sra_distill.losses.sft import SFTConfig
from sra_distill.losses.sra import SRAConfig
from sra_distill.losses.uld import ULDConfig

DEMO_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n"
)


PRECISIONS = ("no", "bf16", "fp16")  # accelerate's mixed precision for the student
TEACHER_PRECISIONS = ("fp32", "bf16", "fp16")  # the keys of models.load.DTYPES
BALANCES = ("alpha", "gradmag")  # how the CE and distillation terms mix (train/weighting.py)
TEACHER_SHARDINGS = ("none", "fsdp")  # a whole teacher per process, or its blocks split across them (engine)


@dataclass
class ArchSettings(Settings):
    """Shape of a randomly initialised model (used when `teacher`/`student` is `random:<arch>`)."""

    hidden_size: int = setting(128, ge=1)  # model width
    num_layers: int = setting(4, ge=1)  # transformer blocks
    num_heads: int = setting(4, ge=1)  # attention heads
    num_kv_heads: int | None = setting(None, ge=1)  # grouped-query heads (Llama-style archs); None = num_heads
    intermediate_size: int | None = setting(None, ge=1)  # MLP width; None = 4 * hidden_size
    max_positions: int = setting(1024, ge=1)  # longest sequence the position table covers
    dropout: float | None = setting(None, ge=0, lt=1)  # every dropout rate of the architecture; None = its default (GPT-2 0.1, Llama 0)

    def check(self) -> None:
        # Attention splits the width into equal heads, and grouped-query attention the heads into equal groups.
        if self.hidden_size % self.num_heads:
            raise SettingError("num_heads", f"must divide hidden_size={self.hidden_size}, got {self.num_heads}")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise SettingError("num_kv_heads", f"must divide num_heads={self.num_heads}, got {self.num_kv_heads}")


@dataclass
class LoraSettings(Settings):
    """LoRA through peft for the student (and optionally a teacher adapter to load)."""

    enabled: bool = False  # train LoRA adapters instead of the full student
    r: int = setting(16, ge=1)  # adapter rank
    alpha: int = setting(32, gt=0)  # scaling numerator (effective scale alpha / r)
    dropout: float = setting(0.05, ge=0, lt=1)  # dropout on the adapter input
    target_modules: list[str] | None = None  # module names to adapt; None = peft's default for the architecture
    merge_on_save: bool = True  # write final/ as a plain merged model loadable without peft


@dataclass
class OnPolicySettings(Settings):
    """On-policy distillation (GKD-style): on some steps the student answers the batch's prompts itself and is
    distilled on its own answers, re-tokenised for the teacher (see `on_policy.py`)."""

    ratio: float = setting(0.0, ge=0, le=1)  # share of steps on-policy, spread evenly (0 = off: dataset responses only; 1 = every step)
    max_new_tokens: int = setting(64, ge=1)  # longest generated response, student tokens
    temperature: float = setting(1.0, ge=0)  # sampling temperature (0 = greedy)
    top_p: float = setting(1.0, gt=0, le=1)  # nucleus sampling mass (1 = off)
    ce_on_generated: bool = False  # also train CE on the student's own text (off, as in GKD: it would reinforce it)


@dataclass
class MethodSettings(Settings):
    """Per-method knobs: one section per method, its `MethodConfig` dataclass in its `losses/<name>.py`, which names
    the methods it serves (`method_names`) and builds the method (`build(context)`). A field here is how a method
    plugs in: adding a method is its file plus one line here."""

    sft: SFTConfig = field(default_factory=SFTConfig)
    sra: SRAConfig = field(default_factory=SRAConfig)
    uld: ULDConfig = field(default_factory=ULDConfig)
    mined: MinEDConfig = field(default_factory=MinEDConfig)
    dskd: DSKDConfig = field(default_factory=DSKDConfig)
    multilevel_ot: MultiLevelOTConfig = field(default_factory=MultiLevelOTConfig)
    alm: ALMConfig = field(default_factory=ALMConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)


def _sections(methods: MethodSettings) -> dict[str, MethodConfig]:
    """Section name -> its method config, in declaration order."""
    return {f.name: getattr(methods, f.name) for f in dataclasses.fields(methods)}


@functools.cache
def method_sections() -> dict[str, str]:
    """Method name -> the `MethodSettings` section it reads, in declaration order (sft, sra, uld, ..., fkl, ...)."""
    return {name: section for section, config in _sections(MethodSettings()).items() for name in config.method_names}


METHOD_NAMES = tuple(method_sections())  # every name `method=` accepts


def method_settings(cfg: Config) -> MethodConfig:
    """The config section of the run's method (e.g. `cfg.methods.sra`)."""
    return _sections(cfg.methods)[method_sections()[cfg.method]]


@dataclass
class Config(Settings):
    """All settings of a run. The defaults ARE the embedded demo (`sra distill` with no arguments): the packaged
    SmolLM2-135M-Instruct teacher (byte-level BPE) distilled into its own pretrained body re-tokenised for Llama-2
    (SentencePiece; `from:smollm2-135m-instruct`, ~125M parameters) on Dolly, sized to finish within 15 minutes on
    2 CPU cores."""

    # --- models -------------------------------------------------------------------------------------------------
    teacher: str = "smollm2-135m-instruct"  # packaged model name, local directory, .gguf file, hub id, or random:<arch>
    student: str = "from:smollm2-135m-instruct"  # same forms as `teacher`, or from:MODEL = MODEL's body with student_tokenizer's vocab
    teacher_tokenizer: str | None = None  # known tokenizer name (listed in --help) or path; None = the model's own
    student_tokenizer: str | None = "llama2"  # likewise
    teacher_arch: ArchSettings = field(default_factory=ArchSettings)  # used only for random:<arch> teachers
    student_arch: ArchSettings = field(default_factory=ArchSettings)  # used only for random:<arch> students
    student_layers: int | list[int] | None = None  # from:MODEL students: decoder blocks kept (count or list); None = all
    teacher_adapter: str | None = None  # a peft adapter directory to load onto the teacher (kept frozen)
    trust_remote_code: bool = setting(False, resume_safe=True)  # allow models/tokenizers that ship their own Python code
    allow_download: bool = setting(False, resume_safe=True)  # let transformers reach the model hub (off: local files only)
    lora: LoraSettings = field(default_factory=LoraSettings)

    # --- data ---------------------------------------------------------------------------------------------------
    train_data: str = "dolly/train.jsonl"  # jsonl file (relative paths resolve against the data root) or datasets name
    dev_data: str | None = setting("dolly/dev.jsonl", resume_safe=True)  # model selection set (never a test set)
    max_train_examples: int | None = setting(None, ge=1)  # use only the first N training records
    max_length: int = 192  # prompt + response tokens per side
    max_prompt_length: int = 128  # prompt tokens kept per side (the last ones)
    num_workers: int = setting(0, ge=0, resume_safe=True)  # data-loader workers (pairing and span alignment run there)

    # --- method -------------------------------------------------------------------------------------------------
    method: str = setting("sra", choices=METHOD_NAMES)  # sft, sra, uld, mined, dskd, multilevel_ot, alm, fkl, rkl, js, skl, srkl, akl
    alpha: float = setting(0.5, ge=0, le=1)  # loss = alpha * CE + (1 - alpha) * distillation
    balance: str = setting("alpha", choices=BALANCES)  # how CE and distillation mix: alpha (the fixed share above) or gradmag (alpha per micro-batch from both terms' gradient norms on the student's last block; tokenkit's ALM recipe)
    methods: MethodSettings = field(default_factory=MethodSettings)
    on_policy: OnPolicySettings = field(default_factory=OnPolicySettings)  # student-generated responses

    # --- optimisation -------------------------------------------------------------------------------------------
    lr: float = setting(5e-5, gt=0)  # student peak learning rate
    weight_decay: float = setting(0.01, ge=0)  # AdamW weight decay (matrices and projectors; not biases or norms)
    projector_weight_decay: float | None = setting(None, ge=0)  # weight decay of the method's own modules; null = weight_decay
    warmup_steps: int = setting(3, ge=0)  # linear warm-up
    min_lr_ratio: float = setting(0.1, ge=0, le=1)  # cosine decay floor as a fraction of the peak
    max_grad_norm: float = setting(1.0, ge=0)  # gradient clipping (0 = off)
    grad_accum: int = setting(1, ge=1)  # gradient accumulation steps per optimiser step
    batch_size: int = setting(8, ge=1)  # per process, per micro-step
    epochs: int = setting(1, ge=1, resume_safe=True)  # passes over the training data (used when max_steps is null)
    max_steps: int | None = setting(24, ge=1, resume_safe=True)  # optimiser steps; overrides epochs when set (null = run `epochs`)
    seed: int = 42  # initialisation, data order and dropout
    precision: str = setting("no", choices=PRECISIONS)  # student mixed precision for accelerate: no, bf16, fp16
    teacher_precision: str = setting("fp32", choices=TEACHER_PRECISIONS)  # teacher weights: fp32, bf16, fp16 (bf16 on GPUs; CPUs without native bf16 run fp32 ~4x faster)
    teacher_sharding: str = setting("none", choices=TEACHER_SHARDINGS, resume_safe=True)  # none: a whole teacher per process; fsdp: its blocks split across the processes
    teacher_cache: str | None = None  # a `sra teacher-cache` folder (auto: built on first use under the cache folder, then reused): teacher states are read there, no teacher loads

    # --- run ----------------------------------------------------------------------------------------------------
    output_dir: str = setting("runs/demo", resume_safe=True)  # metrics, checkpoints, final/ and best/ go here
    log_every: int = setting(1, ge=1, resume_safe=True)  # steps between metrics rows
    save_every: int = setting(100, ge=0, resume_safe=True)  # steps between checkpoints (0 = none)
    keep_last: int = setting(2, ge=0, resume_safe=True)  # newest checkpoints kept (0 = keep all)
    resume: bool = setting(False, resume_safe=True)  # continue from the latest complete checkpoint in output_dir
    overwrite: bool = setting(False, resume_safe=True)  # a fresh run may delete an earlier run's files in output_dir (else it is refused)
    eval_every: int = setting(0, ge=0, resume_safe=True)  # steps between dev ROUGE-L evaluations (0 = off)
    eval_examples: int = setting(16, ge=1, resume_safe=True)  # dev records per evaluation
    eval_max_new_tokens: int = setting(48, ge=1, resume_safe=True)  # generation length during training-time evaluation
    demo_prompt: str | None = setting(DEMO_PROMPT, resume_safe=True)  # answered (greedily) by the student before and after training
    demo_eval_seeds: list[int] | None = setting(default_factory=lambda: [10, 20], resume_safe=True)  # dev ROUGE-L sampling seeds printed before/after training and for the teacher (null = skip)
    demo_eval_examples: int = setting(32, resume_safe=True)  # first N dev records of that before/after comparison
    max_bad_steps: int = setting(5, ge=1, resume_safe=True)  # consecutive non-finite losses before the run stops
    progress: bool = setting(True, resume_safe=True)  # progress bar
    report_to: list[str] = setting(default_factory=list, resume_safe=True)  # experiment trackers: tensorboard, wandb, mlflow, ... or all
    run_name: str | None = setting(None, resume_safe=True)  # the run's name in the trackers and model cards; None = output_dir's folder name

    def check(self) -> None:
        if not 1 <= self.max_prompt_length < self.max_length:
            raise SettingError("max_prompt_length", f"need 1 <= max_prompt_length < max_length (room for a response), "
                               f"got max_prompt_length={self.max_prompt_length}, max_length={self.max_length}")


# Settings that moved into their method's section: old key -> new key. The old key still loads (with a warning).
MOVED_SETTINGS = {
    "normalize_vocab": "methods.sra.normalize_vocab",
    "projector_lr": "methods.sra.projector_lr",
}
# Settings that no longer do anything: an older file that sets one still loads, with a warning saying why.
RETIRED_SETTINGS = {
    "methods.sra.keep_teacher_span_logits": "the span KL forms its gradient in the forward pass, so there is no "
                                            "teacher product to keep for the backward",
}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
        return _build(tp, value, key)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported setting type {tp!r}")


def _first_leaf(value: Any) -> str:
    """`.ratio` for {"ratio": 0.5}: the rest of the dotted key a user wrote under a section ('' for a value)."""
    if isinstance(value, dict) and value:
        name, child = next(iter(value.items()))
        return f".{name}{_first_leaf(child)}"
    return ""


def unknown_setting(key: str, name: str, names: list[str], value: Any) -> ConfigError:
    """The error for an unknown setting `name` (dotted `key`), naming the nearest known one when there is one."""
    close = difflib.get_close_matches(str(name), names, n=1)
    rest = _first_leaf(value)
    if close:
        suggestion = key[: len(key) - len(str(name))] + close[0] + rest
        return ConfigError(f"unknown setting {key + rest!r}; did you mean {suggestion!r}?")
    return ConfigError(f"unknown setting {key + rest!r}; known: {', '.join(sorted(names))}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            raise unknown_setting(key, name, names, value)
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except SettingError as exc:  # the dataclass named its own field: give the whole dotted key
        raise (exc.under(prefix) if prefix else exc) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc


def _move_renamed(tree: dict, source: str) -> dict:
    """`tree` with the settings of MOVED_SETTINGS under their new keys; each old key found is named in a warning."""
    for old, new in MOVED_SETTINGS.items():
        if old not in tree:
            continue
        tree = dict(tree)
        value = tree.pop(old)
        node = tree
        *sections, leaf = new.split(".")
        for part in sections:
            child = node.get(part)
            if child is not None and not isinstance(child, dict):
                raise ConfigError(f"{new}: {part!r} is not a section")
            node[part] = node = dict(child or {})
        if leaf in node:
            raise ConfigError(f"{source}: both {old} (old name) and {new} are set; keep only {new}")
        node[leaf] = value
        warnings.warn(f"{source}: the setting {old} is now {new}; the old name is read for now and will be removed",
                      FutureWarning, stacklevel=3)
    for key, why in RETIRED_SETTINGS.items():
        *sections, leaf = key.split(".")
        node = tree
        for part in sections:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            del node[leaf]  # the tree is the caller's own parsed copy (a YAML file or the overrides)
            warnings.warn(f"{source}: the setting {key} no longer has an effect and is ignored ({why})",
                          FutureWarning, stacklevel=3)
    return tree


def _set_nested(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["lr=1e-4", "methods.sra.geo_weight=10"]` -> nested dict; values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        _set_nested(tree, key, yaml.safe_load(raw) if raw.strip() else None)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then `key=value` overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} not found") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping of settings at the top level")
        tree = _move_renamed(loaded or {}, f"config file {path}")
    tree = _merge(tree, _move_renamed(parse_overrides(overrides or []), "overrides"))
    return _build(Config, tree)


def config_to_dict(cfg: Any) -> Any:
    """Plain dict (YAML/JSON-ready) of a config tree."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
