"""Every setting with its type, default and doc, read from the dataclasses themselves (`sra distill --help`).

The docs are the comments on each field's line in `config.py` and in the methods' config dataclasses (a comment
block right above a field documents it when the line has none). They are read from the source with `tokenize`,
so they are written once, where the setting is declared. `# --- name ---` comments in `Config` open a section.
Each setting's allowed range or names come from its field's rules (`fields.setting`).

`sra distill --help` prints HELP_FILE, which `python -m sra_distill.settings_doc` writes from these dataclasses
(a test keeps it equal to them): reading the dataclasses imports torch, which --help should not wait for.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import json
import re
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sra_distill.config import Config
from sra_distill.data.tokenization import KNOWN_TOKENIZERS
from sra_distill.fields import rule_text
from sra_distill.models.sources import PACKAGED_MODELS
from sra_distill.paths import config_names

HELP_FILE = Path(__file__).with_name("settings_help.txt")

_SECTION = re.compile(r"^#\s*-+\s*([A-Za-z][\w ]*?)\s*-+\s*$")


@dataclass(frozen=True)
class Setting:
    key: str  # dotted, as in key=value overrides
    type: str
    default: Any
    doc: str
    section: str
    rule: str = ""  # the values it allows: "> 0", "in [0, 1]", "one of no, bf16, fp16" ('' = any of its type)
    resume_safe: bool = False  # may change when a run resumes (not part of the run's fingerprint)


@functools.cache
def field_comments(cls: type) -> dict[str, tuple[str, str]]:
    """field name -> (doc, section) from the class source: the comment on the field's line, else the comment
    lines right above it; section: the last `# --- name ---` comment before the field ('' if none)."""
    source = textwrap.dedent(inspect.getsource(cls))
    docs: dict[str, tuple[str, str]] = {}
    pending: list[str] = []  # comment-only lines since the last code line
    section = ""
    depth = 0
    line_tokens: list[tokenize.TokenInfo] = []

    def finish_line(tokens: list[tokenize.TokenInfo]) -> None:
        nonlocal pending, section
        code = [t for t in tokens if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE,
                                                     tokenize.INDENT, tokenize.DEDENT)]
        comments = [t.string for t in tokens if t.type == tokenize.COMMENT]
        if not code:
            if comments:
                match = _SECTION.match(comments[0])
                if match:
                    section, pending = match.group(1).strip(), []
                else:
                    pending.append(comments[0].lstrip("#").strip())
            else:
                pending = []  # a blank line ends a comment block
            return
        is_field = (depth == 1 and len(code) >= 2 and code[0].type == tokenize.NAME and code[1].string == ":")
        if is_field:
            trailing = " ".join(c.lstrip("#").strip() for c in comments)
            docs[code[0].string] = (trailing or " ".join(pending), section)
        pending = []

    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.INDENT:
            depth += 1
            continue
        if token.type == tokenize.DEDENT:
            depth -= 1
            continue
        line_tokens.append(token)
        if token.type in (tokenize.NEWLINE, tokenize.NL):
            finish_line(line_tokens)
            line_tokens = []
    return docs


def docstring_fields(cls: type) -> dict[str, str]:
    """field name -> doc from `name[, name]: doc` lines of the class docstring (how the methods' config classes
    document their fields); continuation lines join the previous entry."""
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    current: list[str] = []
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        head, sep, rest = line.partition(":")
        keys = [k.strip() for k in head.split(",")]
        if sep and keys and all(k in names for k in keys):
            current = keys
            for key in keys:
                docs[key] = rest.strip()
        elif current and line.strip():
            for key in current:
                docs[key] += " " + line.strip()
        else:
            current = []
    return docs


def _one_line(doc: str) -> str:
    """The first sentence of a doc (the help shows one line per setting)."""
    match = re.search(r"(?<=[a-z)`])\. (?=[A-Z])", doc)
    return doc[: match.start() + 1] if match else doc


def type_name(tp: Any) -> str:
    """`int | None`, `list[tuple[int, int]]`, ... as written in the dataclass."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(arg) for arg in typing.get_args(tp))}]"
    if tp is type(None):
        return "None"
    if tp is Ellipsis:  # tuple[int, ...]
        return "..."
    if tp is Any:
        return "any"
    return tp.__name__  # a plain class: int, float, str, bool


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _section_class(tp: Any) -> type | None:
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def settings(cls: type = Config, prefix: str = "", section: str = "") -> list[Setting]:
    """Every leaf setting under `cls`, in declaration order (nested sections flattened to dotted keys)."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    from_docstring = docstring_fields(cls)
    out: list[Setting] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        doc, own_section = comments.get(f.name, ("", ""))
        nested = _section_class(hints[f.name])
        if nested is not None:  # a nested section: its settings stay under the parent's section heading
            out += settings(nested, f"{key}.", section or own_section)
            continue
        doc = _one_line(doc or from_docstring.get(f.name, ""))
        out.append(Setting(key, type_name(hints[f.name]), _default(f), doc, section or own_section,
                           rule_text(f.metadata), bool(f.metadata.get("resume_safe"))))
    return out


def format_default(value: Any, width: int = 48) -> str:
    """A default as YAML would spell it in an override (null, true, [[-1, -1]]), long text shortened."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = value if isinstance(value, str) and "\n" not in value else json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def notes(s: Setting) -> str:
    """`  (> 0)`, `  (>= 1; may change on resume)` after a setting's default in the help ('' when there is none)."""
    parts = [part for part, shown in ((s.rule, bool(s.rule)), ("may change on resume", s.resume_safe)) if shown]
    return f"  ({'; '.join(parts)})" if parts else ""


def settings_help() -> str:
    """The settings reference shown by `sra distill --help`."""
    lines = ["settings (key=value after the command, dots for nested keys; --config FILE sets them in YAML):"]
    section = None
    for s in settings():
        if s.section != section:
            section = s.section
            lines += ["", f" {section}:" if section else " other:"]
        lines.append(f"  {s.key}: {s.type} = {format_default(s.default)}{notes(s)}")
        if s.doc:
            lines.append(f"      {s.doc}")
    return "\n".join(lines)


def names_help() -> str:
    """The names settings accept besides paths: known tokenizers, packaged models and packaged configs."""
    lines = [f"known tokenizer names (teacher_tokenizer, student_tokenizer): {', '.join(sorted(KNOWN_TOKENIZERS))}",
             f"packaged models (teacher, student, from:MODEL): {', '.join(PACKAGED_MODELS)}",
             f"packaged configs (--config): {', '.join(config_names())}"]
    return "\n".join(textwrap.fill(line, 118, subsequent_indent="    ") for line in lines) + "\n"


def distill_help() -> str:
    """The epilog of `sra distill --help`: every setting, then the names settings accept."""
    return settings_help() + "\n" + names_help()


if __name__ == "__main__":  # python -m sra_distill.settings_doc: rewrite HELP_FILE after changing a setting
    HELP_FILE.write_text(distill_help(), encoding="utf-8")
    print(f"wrote {HELP_FILE}")
