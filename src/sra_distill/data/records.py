"""Training and evaluation records: read, validate, normalise to `Record`.

Three record formats, detected per record (`format="auto"`) or forced:

* ``prompt`` (DSKD/MiniLLM jsonl): ``{"prompt": str, "output": str | list[str], ...}``; a list of outputs is the
  list of references (S-NI), the training response is the first one.
* ``alpaca``: ``{"instruction": str, "input": str (optional), "output": str | list[str]}`` without ``prompt``; the
  prompt is rendered with the Alpaca template the MiniLLM/DSKD files use (``ALPACA_TEMPLATE`` /
  ``ALPACA_TEMPLATE_NO_INPUT``; the Input block is omitted when ``input`` is empty), which reproduces the ``prompt``
  field of every shared evaluation file exactly.
* ``chat``: ``{"messages": [{"role": str, "content": str}, ...]}`` whose LAST message is the assistant response;
  the earlier turns are kept in ``Record.messages`` and rendered later by each tokenizer's own chat template.

A path that is a local file is read as jsonl (blank lines skipped); anything else is handed to
``datasets.load_dataset(path, split=split)`` and its rows go through the same validation. Malformed input stops
with a `DataError` naming file, line and field; records with an empty response are skipped and counted in the
`LoadReport` (never dropped silently).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from sra_distill.errors import ConfigError, DataError
from sra_distill.paths import data_root_note, resolve_data_path

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
FORMATS = ("auto", "prompt", "alpaca", "chat")


@dataclass
class Record:
    """One example. Exactly one of `prompt` (rendered text) and `messages` (chat turns before the response) is set.

    response: the training target (the first reference); references: every reference answer, for ROUGE-L.
    source, line: where the record came from (file or dataset name, 1-based line or row).
    """

    prompt: str | None
    response: str
    references: list[str]
    messages: list[dict] | None
    source: str
    line: int


@dataclass
class LoadReport:
    """What loading did: `read` records seen (blank lines excluded), `loaded` kept, and the empty-response skips."""

    source: str
    read: int = 0
    loaded: int = 0
    skipped_empty_response: list[tuple[str, int]] = field(default_factory=list)  # (source, line)

    @property
    def n_skipped_empty_response(self) -> int:
        return len(self.skipped_empty_response)

    def summary(self) -> str:
        where = ", ".join(f"line {line}" for _, line in self.skipped_empty_response[:10])
        more = "" if self.n_skipped_empty_response <= 10 else ", ..."
        skipped = f"; skipped {self.n_skipped_empty_response} with empty response ({where}{more})" if where else ""
        return f"{self.source}: read {self.read}, loaded {self.loaded}{skipped}"


def _fail(source: str, line: int, field_name: str, problem: str) -> DataError:
    return DataError(f"{source} line {line}: field {field_name!r} {problem}")


def _type_name(value: Any) -> str:
    return type(value).__name__


def _string(obj: dict, key: str, source: str, line: int, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise _fail(source, line, key, f"must be a string, got {_type_name(value)}")
    return value


def _references(obj: dict, source: str, line: int) -> list[str]:
    output = obj["output"]
    if isinstance(output, str):
        return [output]
    if isinstance(output, list) and output and all(isinstance(o, str) for o in output):
        return list(output)
    if isinstance(output, list) and not output:
        raise _fail(source, line, "output", "is an empty list (expected a string or a non-empty list of strings)")
    raise _fail(source, line, "output", f"must be a string or a list of strings, got {_type_name(output)}")


def _detect(obj: dict, source: str, line: int) -> str:
    if "messages" in obj:
        return "chat"
    if "output" in obj and "prompt" in obj:
        return "prompt"
    if "output" in obj and "instruction" in obj:
        return "alpaca"
    raise DataError(
        f"{source} line {line}: record matches no known format (fields {sorted(obj)}); expected 'prompt'+'output' "
        f"(DSKD/MiniLLM), 'instruction'+'output' (Alpaca) or 'messages' (chat)"
    )


def _require(obj: dict, keys: tuple[str, ...], fmt: str, source: str, line: int) -> None:
    for key in keys:
        if key not in obj:
            raise _fail(source, line, key, f"is missing (required by format {fmt!r})")


def _parse_chat(obj: dict, source: str, line: int) -> tuple[list[dict], str]:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise _fail(source, line, "messages", f"must be a non-empty list of {{role, content}}, got {messages!r:.60}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _fail(source, line, f"messages[{i}]", f"must be an object, got {_type_name(message)}")
        for key in ("role", "content"):
            value = message.get(key)
            if not isinstance(value, str):
                raise _fail(source, line, f"messages[{i}].{key}", f"must be a string, got {_type_name(value)}")
    if len(messages) < 2:
        raise _fail(source, line, "messages", "needs at least one turn before the assistant response")
    if messages[-1]["role"] != "assistant":
        raise _fail(
            source, line, "messages", f"must end with the assistant response, last role is {messages[-1]['role']!r}"
        )
    history = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    return history, messages[-1]["content"]


def parse_record(obj: Any, source: str, line: int, format: str = "auto") -> Record:
    """Validate one decoded JSON value and normalise it to a `Record` (empty responses are returned as-is)."""
    if not isinstance(obj, dict):
        raise DataError(f"{source} line {line}: record must be a JSON object, got {_type_name(obj)}")
    fmt = _detect(obj, source, line) if format == "auto" else format
    if fmt == "chat":
        _require(obj, ("messages",), fmt, source, line)
        history, response = _parse_chat(obj, source, line)
        return Record(None, response, [response], history, source, line)
    _require(obj, ("prompt", "output") if fmt == "prompt" else ("instruction", "output"), fmt, source, line)
    references = _references(obj, source, line)
    if fmt == "prompt":
        prompt = _string(obj, "prompt", source, line)
    else:
        instruction = _string(obj, "instruction", source, line)
        context = _string(obj, "input", source, line, required=False)
        template = ALPACA_TEMPLATE if context else ALPACA_TEMPLATE_NO_INPUT
        prompt = template.format(instruction=instruction, input=context)
    return Record(prompt, references[0], references, None, source, line)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:  # decoded per line, so a bad byte is reported with its line
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} line {line_no}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                                f"{e.start + 1} of the line); save the file as UTF-8") from None
            if not text.strip():
                continue
            try:
                yield line_no, json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {line_no}: not valid JSON ({e.msg} at column {e.colno})") from None


def _dataset_rows(name: str, split: str) -> Iterator[tuple[int, Any]]:
    try:
        import datasets  # lazy: optional dependency
    except ImportError:
        raise DataError(
            f"{name!r} is not a local file, and loading it as a dataset needs the `datasets` package "
            f"(pip install 'sra-distill[datasets]')"
        ) from None
    for row_no, row in enumerate(datasets.load_dataset(name, split=split), start=1):
        yield row_no, row


def load_records_with_report(
    path: str | os.PathLike, format: str = "auto", split: str = "train", limit: int | None = None
) -> tuple[list[Record], LoadReport]:
    """Read records from a jsonl file (path as given or relative to the data root) or a `datasets` dataset name.

    format: "auto" (per record), "prompt", "alpaca" or "chat". limit: stop after that many loaded records.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown record format {format!r}; expected one of {FORMATS}")
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")
    resolved = resolve_data_path(path)
    if resolved.is_file():
        source, rows = str(resolved), _jsonl_rows(resolved)
    elif str(path).endswith((".jsonl", ".json")):  # meant as a file: never try the hub
        tried = " and ".join(dict.fromkeys([str(Path(path).expanduser()), str(resolved)]))
        raise DataError(f"{path}: file not found (looked for {tried}; {data_root_note()})")
    else:
        source, rows = str(path), _dataset_rows(str(path), split)
    report = LoadReport(source)
    records = _collect(rows, source, format, limit, report)
    return records, report


def _collect(
    rows: Iterable[tuple[int, Any]], source: str, format: str, limit: int | None, report: LoadReport
) -> list[Record]:
    records: list[Record] = []
    for line_no, obj in rows:
        if limit is not None and len(records) >= limit:
            break
        report.read += 1
        record = parse_record(obj, source, line_no, format)
        if not record.response.strip():
            report.skipped_empty_response.append((source, line_no))
            continue
        records.append(record)
    report.loaded = len(records)
    return records


def load_records(
    path: str | os.PathLike, format: str = "auto", split: str = "train", limit: int | None = None
) -> list[Record]:
    """`load_records_with_report` without the report (see it for the arguments)."""
    return load_records_with_report(path, format, split, limit)[0]
