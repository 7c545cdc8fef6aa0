"""Settings declared with their rules: a setting's allowed range or names and whether it may change on resume are
field metadata on the dataclass that declares it, read by the one checker here.

    lr: float = setting(5e-5, gt=0)  # student peak learning rate
    log_every: int = setting(1, ge=1, resume_safe=True)  # steps between metrics rows

Every settings dataclass derives from `Settings`, which checks its fields when it is built (so a bad value is refused
wherever the dataclass is made: the YAML loader, a test, `DistillTrainer(method_config=...)`): every float must be
finite, a value other than None must lie in its field's range or names, and `check()` holds the rules that tie
several fields of one dataclass together. Rules across sections are in `validation.py`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from sra_distill.errors import ConfigError


class SettingError(ConfigError):
    """A bad value of one setting: `key` (dotted below the dataclass that refused it) and what is wrong with it."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem

    def under(self, section: str) -> SettingError:
        """The same error keyed from the enclosing section (`hidden_size` -> `student_arch.hidden_size`)."""
        return SettingError(f"{section}.{self.key}", self.problem)


def setting(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
    resume_safe: bool = False,
) -> Any:
    """A dataclass field with its rules: bounds (ge/gt/le/lt), allowed names (choices), and `resume_safe` (the
    setting may change when a run resumes: it does not shape the training trajectory)."""
    metadata = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "resume_safe": resume_safe}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def _bounds(meta) -> tuple[float | None, bool, float | None, bool]:
    """(low, low excluded, high, high excluded) of a field's rules; None for a side without a bound."""
    low, low_open = (meta["gt"], True) if meta.get("gt") is not None else (meta.get("ge"), False)
    high, high_open = (meta["lt"], True) if meta.get("lt") is not None else (meta.get("le"), False)
    return low, low_open, high, high_open


def range_text(meta) -> str:
    """`>= 1`, `> 0`, `in [0, 1]`, `in (0, 1]` for a field's bounds ('' when it has none)."""
    low, low_open, high, high_open = _bounds(meta)
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def rule_text(meta) -> str:
    """What a field allows, for the settings help: `> 0`, `in [0, 1]`, `one of no, bf16, fp16` ('' for any value)."""
    choices = meta.get("choices")
    return f"one of {', '.join(choices)}" if choices is not None else range_text(meta)


def _in_range(value: float, meta) -> bool:
    low, low_open, high, high_open = _bounds(meta)
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def check_field(rules: dataclasses.Field, value: Any) -> None:
    """Refuse `value` for the field `rules` (a SettingError naming the field) when it breaks the field's rules."""
    if isinstance(value, float) and not math.isfinite(value):
        raise SettingError(rules.name, f"must be a finite number, got {value!r}")
    if value is None:  # an optional setting left unset: its rules apply to a value
        return
    choices = rules.metadata.get("choices")
    if choices is not None and value not in choices:
        raise SettingError(rules.name, f"expected one of {', '.join(choices)}, got {value!r}")
    if isinstance(value, (int, float)) and not _in_range(value, rules.metadata):
        raise SettingError(rules.name, f"must be {range_text(rules.metadata)}, got {value!r}")


class Settings:
    """Base of every settings dataclass: its fields are checked when it is built (see the module docstring)."""

    def __post_init__(self) -> None:
        self.check_rules()

    def check_rules(self) -> None:
        """Every rule of this dataclass's own fields, then `check()` (not the sections under it: `check_tree`)."""
        for rules in dataclasses.fields(self):
            check_field(rules, getattr(self, rules.name))
        self.check()

    def check(self) -> None:
        """Rules that tie several fields of this dataclass together; raise a SettingError naming the key. Most
        dataclasses have none."""


def check_tree(tree: Settings) -> None:
    """Every rule of `tree` and of every section under it, as when they were built: a setting changed in code
    afterwards (`cfg.lr = ...`) is checked too. The error names the dotted key below `tree`."""
    for rules in dataclasses.fields(tree):
        value = getattr(tree, rules.name)
        if isinstance(value, Settings):
            try:
                check_tree(value)
            except SettingError as exc:
                raise exc.under(rules.name) from None
    tree.check_rules()


def resume_safe_keys(tree: Any, prefix: str = "") -> frozenset[str]:
    """The dotted keys of the settings under the dataclass instance `tree` declared `resume_safe`."""
    keys: set[str] = set()
    for rules in dataclasses.fields(tree):
        key = f"{prefix}{rules.name}"
        value = getattr(tree, rules.name)
        if dataclasses.is_dataclass(value):
            keys |= resume_safe_keys(value, f"{key}.")
        elif rules.metadata.get("resume_safe"):
            keys.add(key)
    return frozenset(keys)
