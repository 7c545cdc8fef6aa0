"""Record loading: every format, every validation error, the Alpaca template against the real data files."""

from __future__ import annotations

import json
import sys

import pytest

from sra_distill.data.records import DataError, Record, load_records, load_records_with_report, parse_record
from sra_distill.paths import data_root

EVAL_FILES = [
    "dolly/train.jsonl",
    "dolly/dev.jsonl",
    "dolly/valid.jsonl",
    "self-inst/valid.jsonl",
    "vicuna/valid.jsonl",
    "sinst/11_/valid.jsonl",
    "dialogsum/valid.jsonl",
]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_dskd_prompt_format_with_string_and_list_outputs(tmp_path):
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "P1", "output": "A1", "instruction": "x"}, {"prompt": "P2", "output": ["B1", "B2"]}],
    )
    records = load_records(f)
    assert records == [
        Record("P1", "A1", ["A1"], None, str(f), 1),
        Record("P2", "B1", ["B1", "B2"], None, str(f), 2),
    ]


def test_alpaca_format_renders_template_with_and_without_input(tmp_path):
    f = write_jsonl(
        tmp_path / "a.jsonl",
        [{"instruction": "Do it.", "input": "ctx", "output": "ok"}, {"instruction": "Say hi.", "output": "hi"}],
    )
    with_input, without_input = load_records(f)
    assert with_input.prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nDo it.\n\n"
        "### Input:\nctx\n\n### Response:\n"
    )
    assert without_input.prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert without_input.response == "hi" and without_input.references == ["hi"]


@pytest.mark.parametrize("name", EVAL_FILES)
def test_alpaca_template_reproduces_the_real_prompt_fields(name):
    path = data_root() / name
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = rows[:2000]  # dolly/train is 11k rows; its first 2000 cover both templates
    assert any(r.get("input") for r in rows) or name == "vicuna/valid.jsonl"
    for i, row in enumerate(rows, start=1):
        alpaca = {k: row[k] for k in ("instruction", "input", "output") if k in row}
        rendered = parse_record(alpaca, name, i, format="alpaca").prompt
        assert rendered == row["prompt"], f"{name} line {i}"


def test_real_files_load_with_references():
    records, report = load_records_with_report("sinst/11_/valid.jsonl")
    assert report.read == report.loaded == len(records) == 1694
    assert all(r.references and r.response == r.references[0] for r in records)
    assert max(len(r.references) for r in records) > 1
    assert load_records("dolly/valid.jsonl", limit=3)[2].line == 3


def test_chat_format_keeps_history_and_takes_last_assistant_turn(tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name?"},
        {"role": "assistant", "content": "Bot."},
    ]
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])
    (record,) = load_records(f)
    assert record.prompt is None
    assert record.messages == messages[:-1]
    assert record.response == "Bot." and record.references == ["Bot."]


def test_blank_lines_skipped_and_empty_responses_counted(tmp_path):
    f = write_jsonl(
        tmp_path / "e.jsonl",
        [{"prompt": "p", "output": "a"}, "", "   ", {"prompt": "p", "output": "  \n"}, {"prompt": "p", "output": "b"}],
    )
    records, report = load_records_with_report(f)
    assert [r.response for r in records] == ["a", "b"]
    assert [r.line for r in records] == [1, 5]
    assert report.read == 3 and report.loaded == 2
    assert report.skipped_empty_response == [(str(f), 4)]
    assert "line 4" in report.summary()


def test_limit_counts_loaded_records(tmp_path):
    f = write_jsonl(tmp_path / "l.jsonl", [{"prompt": "p", "output": o} for o in ["", "a", "b", "c"]])
    assert [r.response for r in load_records(f, limit=2)] == ["a", "b"]


def test_relative_path_resolves_against_data_root(monkeypatch, tmp_path):
    write_jsonl(tmp_path / "sub.jsonl", [{"prompt": "p", "output": "a"}])
    monkeypatch.setenv("SRA_DATA_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)
    assert load_records("sub.jsonl")[0].source == str(tmp_path / "sub.jsonl")


BAD_RECORDS = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ({"text": "x"}, "matches no known format"),
    ({"prompt": "p", "output": 3}, "'output'"),
    ({"prompt": "p", "output": []}, "'output'"),
    ({"prompt": "p", "output": ["a", 1]}, "'output'"),
    ({"prompt": 5, "output": "a"}, "'prompt'"),
    ({"instruction": ["x"], "output": "a"}, "'instruction'"),
    ({"instruction": "x", "input": 2, "output": "a"}, "'input'"),
    ({"messages": "hello"}, "'messages'"),
    ({"messages": []}, "'messages'"),
    ({"messages": ["hi"]}, "'messages[0]'"),
    ({"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "a"}]}, "'messages[0].content'"),
    ({"messages": [{"content": "x"}, {"role": "assistant", "content": "a"}]}, "'messages[0].role'"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, "'messages'"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "'messages'"),
]


@pytest.mark.parametrize("bad, field_text", BAD_RECORDS)
def test_validation_errors_name_file_line_and_field(tmp_path, bad, field_text):
    f = write_jsonl(tmp_path / "bad_file.jsonl", [{"prompt": "p", "output": "ok"}, "", bad])
    with pytest.raises(DataError) as info:
        load_records(f)
    message = str(info.value)
    assert "bad_file.jsonl" in message and "line 3" in message and field_text in message


@pytest.mark.parametrize(
    "fmt, row, field_text",
    [
        ("prompt", {"instruction": "x", "output": "a"}, "'prompt'"),
        ("alpaca", {"prompt": "x", "output": "a"}, "'instruction'"),
        ("chat", {"prompt": "x", "output": "a"}, "'messages'"),
    ],
)
def test_forced_format_requires_its_fields(tmp_path, fmt, row, field_text):
    f = write_jsonl(tmp_path / "forced.jsonl", [row])
    with pytest.raises(DataError, match=f"forced.jsonl line 1: field {field_text} is missing"):
        load_records(f, format=fmt)


def test_unknown_format_and_negative_limit_rejected(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "output": "a"}])
    with pytest.raises(ValueError, match="unknown record format 'csv'"):
        load_records(f, format="csv")
    with pytest.raises(ValueError, match="limit"):
        load_records(f, limit=-1)


def test_non_file_path_goes_through_datasets_with_same_validation(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "local_ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "p", "output": "a"}, {"prompt": "q", "output": ""}])
    records, report = load_records_with_report(str(folder), split="train")
    assert [(r.prompt, r.response, r.line) for r in records] == [("p", "a", 1)]
    assert report.skipped_empty_response == [(str(folder), 2)]


def test_missing_datasets_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match="needs the `datasets` package"):
        load_records("no/such/dataset-name")
