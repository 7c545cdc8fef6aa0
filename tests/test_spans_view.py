"""`sra spans`: both tokenizations and their spans, checked against `spans.align_spans` and the raw tokenizers."""

import html
import json
import re
import unicodedata

import pytest

from sra_distill.cli import main
from sra_distill.data.records import load_records
from sra_distill.data.spans import align_spans
from sra_distill.data.spans_view import (
    EMPTY_TOKEN,
    TOKEN_MARK,
    render_html,
    render_side_terminal,
    span_color,
    span_statistics,
    text_record,
    view_record,
)
from sra_distill.data.tokenization import load_tokenizer
from sra_distill.data.vocab import overlap_report

TEXT = "Hello unbelievable 日本語 👨‍👩‍👧 café مرحبا e\u0301!\nNew line."  # NFC merges e + U+0301
NFC = unicodedata.normalize("NFC", TEXT)
PAIRS = [("gpt2", "llama2"), ("gpt-neox", "qwen1.5"), ("smollm2", "mistral")]


@pytest.fixture(scope="module", params=PAIRS, ids=["-".join(p) for p in PAIRS])
def pair(request):
    student, teacher = (load_tokenizer(n) for n in request.param)
    return student, teacher, view_record(text_record(TEXT), student, teacher)


def test_tokens_rebuild_the_text_and_span_k_is_the_same_text_on_both_sides(pair):
    _, _, view = pair
    for side in (view.student, view.teacher):
        assert "".join(t.text for t in side.tokens if not t.special) == NFC == view.response
        assert side.tokens[-1].special and side.tokens[-1].span == -1  # EOS is in no span
    for k in range(view.num_spans):
        student_text = "".join(t.text for t in view.student.tokens if t.span == k)
        teacher_text = "".join(t.text for t in view.teacher.tokens if t.span == k)
        assert student_text == teacher_text and student_text


def test_spans_and_statistics_match_align_spans(pair):
    student, teacher, view = pair
    s_enc = student(NFC, add_special_tokens=False, return_offsets_mapping=True)
    t_enc = teacher(NFC, add_special_tokens=False, return_offsets_mapping=True)
    spans = align_spans(s_enc["offset_mapping"], t_enc["offset_mapping"])
    assert view.num_spans == len(spans)
    assert [t.id for t in view.student.tokens if not t.special] == s_enc["input_ids"]
    for k, (s0, s1, t0, t1) in enumerate(spans):
        assert [i for i, t in enumerate(view.student.tokens) if t.span == k] == list(range(s0, s1))
        assert [i for i, t in enumerate(view.teacher.tokens) if t.span == k] == list(range(t0, t1))
    stats = span_statistics([view])
    n_s, n_t = len(s_enc["input_ids"]), len(t_enc["input_ids"])
    assert stats["spans"] == len(spans)
    assert stats["student"]["spans_per_token"] == pytest.approx(len(spans) / n_s)
    assert stats["teacher"]["spans_per_token"] == pytest.approx(len(spans) / n_t)
    assert stats["student"]["multi_token_spans"] == sum(s1 - s0 > 1 for s0, s1, _, _ in spans)
    assert stats["teacher"]["multi_token_spans"] == sum(t1 - t0 > 1 for _, _, t0, t1 in spans)
    either = sum(s1 - s0 > 1 or t1 - t0 > 1 for s0, s1, t0, t1 in spans)
    assert stats["multi_token_share_either_side"] == pytest.approx(either / len(spans))


def test_byte_pieces_of_one_character_show_as_empty():
    student, teacher = load_tokenizer("gpt2"), load_tokenizer("llama2")
    view = view_record(text_record("日"), student, teacher)
    shown = [t.text for t in view.student.tokens if not t.special]
    assert shown[0] == "日" and shown[1:] and set(shown[1:]) == {""}  # GPT-2: one character, several byte tokens
    assert EMPTY_TOKEN in render_side_terminal(view.student, color=False)


def test_terminal_colour_and_plain():
    student, teacher = load_tokenizer("gpt2"), load_tokenizer("llama2")
    view = view_record(text_record("Hello unbelievable world"), student, teacher)
    plain = render_side_terminal(view.teacher, color=False)
    assert "\x1b" not in plain
    assert plain.startswith("[Hello][ un|bel|iev|able][ world]")  # spans in brackets, tokens split by |
    coloured = render_side_terminal(view.teacher, color=True)
    assert coloured.count("\x1b[30;48;5;") == len(view.teacher.tokens) - 1  # every spanned token, EOS dim
    assert TOKEN_MARK in coloured and "\x1b[2m" in coloured


def test_html_colours_span_k_alike_on_both_sides_and_shows_ids(pair):
    student, teacher, view = pair
    page = render_html([view], span_statistics([view]), overlap_report(student, teacher))
    cells = re.findall(r'data-ex="0" data-span="(-?\d+)" title="id (\d+) [^"]*"(?: style="background:([^"]+)")?', page)
    assert len(cells) == len(view.student.tokens) + len(view.teacher.tokens)
    colours = {}
    for span, _, colour in cells:
        colours.setdefault(int(span), set()).add(colour)
    for k in range(view.num_spans):
        assert colours[k] == {span_color(k)}
    ids = [int(i) for _, i, _ in cells]
    assert ids == [t.id for t in view.student.tokens] + [t.id for t in view.teacher.tokens]
    assert "Shared vocabulary: exact" in page and "spans/token" in page


def test_html_explains_its_marks_in_a_legend(pair):
    view = pair[2]
    page = render_html([view], span_statistics([view]), None)
    legend = page[page.index('<div class="legend">'):page.index("</dl></div>")]
    assert page.index(legend) < page.index('<div class="record">')  # read before the first record
    assert "<b>Colour</b>: one span" in legend and "<b>Thin line</b>" in legend and "token boundary" in legend
    assert f"<b>{EMPTY_TOKEN}</b>: a token that adds no character" in legend
    assert '<span class="tok none">&lt;/s&gt;</span>' in legend
    assert "<b>Dashed grey box</b>: a token in no span" in legend
    assert "↵" in legend and "end-of-sequence token (EOS" in legend


def test_html_shows_the_input_text_and_token_ids_and_ranges_on_demand(tmp_path):
    student, teacher = load_tokenizer("gpt2"), load_tokenizer("llama2")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Say <hello> twice.\n", "output": "Hello & hello."}))
    record = load_records(str(data))[0]
    view = view_record(record, student, teacher)
    page = render_html([view], span_statistics([view]), None)
    assert view.prompt == record.prompt and html.escape(record.prompt) in page  # the prompt, collapsed
    assert re.search(r"<details><summary>prompt \(\d+ characters, not spanned\)</summary><div class=\"input\">"
                     + re.escape(html.escape(record.prompt)), page)
    assert f'<div class="input">{html.escape(view.response)}</div>' in page  # the response both sides split
    metas = re.findall(r'<span class="meta">(\d+)<br>(\d+)–(\d+)</span>', page)
    tokens = view.student.tokens + view.teacher.tokens
    assert metas == [(str(t.id), str(t.start), str(t.end)) for t in tokens]
    # Hidden until the checkbox is ticked, by CSS alone: the checkbox precedes the records as their sibling.
    assert ".meta { display: none;" in page and "#show-ids:checked ~ .record .meta { display: block; }" in page
    body = page[page.index("<body>"):]
    assert body.index('<input type="checkbox" id="show-ids">') < body.index('<div class="record">')


def test_sra_spans_cli_text_and_data(tmp_path, capsys):
    html_path = tmp_path / "spans.html"
    assert main(["spans", "--student-tokenizer", "gpt2", "--teacher-tokenizer", "llama2", "--text", TEXT,
                 "--html", str(html_path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out  # not a terminal: plain
    assert "[ un|bel|iev|able]" in out and "spans/token" in out and "shared vocabulary: exact" in out
    assert html_path.read_text(encoding="utf-8").startswith("<!doctype html>")

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Q{i}\n", "output": f"Answer number {i}."}) for i in range(5)))
    assert main(["spans", "--student-tokenizer", "gpt-neox", "--teacher-tokenizer", "qwen1.5", "--data", str(data),
                 "--max-records", "2", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert out.count("== ") == 2 and f"{data} line 2" in out and "2 record(s)" in out


@pytest.mark.parametrize("args, message", [
    (["--text", ""], "--text is empty"),
    (["--text", "x", "--max-records", "0"], "--max-records must be >= 1"),
    (["--text", "x", "--teacher-tokenizer", "no-such-tokenizer"], "not a known name"),
    (["--data", "no/such/file.jsonl"], "no/such/file.jsonl"),
])
def test_sra_spans_bad_arguments_exit_2(capsys, args, message):
    base = {"--student-tokenizer": "gpt2", "--teacher-tokenizer": "llama2"}
    given = dict(zip(args[::2], args[1::2]))
    argv = ["spans", *[x for k, v in {**base, **given}.items() for x in (k, v)]]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
