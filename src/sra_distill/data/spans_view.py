"""`sra spans`: how two tokenizers split the same responses, and the spans SRA aligns between them.

The spans come from the training pipeline itself (`pairing.pair_example`, then `spans.span_ids`), so what is shown
is what training uses (including its NFC normalisation of the response): only the response is spanned (for `--text`
the text is the response of an empty prompt), special tokens (EOS) and the tokens after the last common cut belong to
no span (span id -1).

The HTML page (`--html`) opens with a legend of its marks (colours, token boundaries, ◌, the dashed box of tokens
in no span), shows each record's prompt (collapsed) and response, and reveals every token's id and character range
under a checkbox (CSS only; the tooltips hold them too).

Each token is shown by the characters it adds to the response: `response[reach:end]` with `reach` the furthest end
of the tokens before it (so a space that a tokenizer leaves out of its offsets, as GPT-NeoX does, still shows, in the
token after it, the span that covers it). Byte pieces of a character an earlier token already covered (GPT-2 splits
"日" into three byte tokens with the same offsets) and empty-offset tokens add nothing and are shown as "◌".

Statistics over the shown records, per side (N = response tokens that are not special, K = spans):

    spans per token = K / N            (1.0: every token is its own span; lower: tokens merge into shared spans)
    multi-token share = #{spans with more than one token on that side (or on either side)} / K

and the shared vocabulary of the two tokenizers, exact and normalised (`vocab.overlap_report`).
"""

from __future__ import annotations

import argparse
import html
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from sra_distill.data.pairing import pair_example
from sra_distill.data.records import Record, load_records
from sra_distill.data.spans import example_span_ids
from sra_distill.data.tokenization import load_tokenizer
from sra_distill.data.vocab import overlap_report
from sra_distill.errors import ConfigError, DataError, NotFoundError

EMPTY_TOKEN = "◌"
TOKEN_MARK = "▏"  # thin separator between the tokens of one span in the terminal
# Terminal backgrounds (xterm-256 light colours) cycled over spans; black text on top.
TERMINAL_BACKGROUNDS = (153, 223, 194, 225, 230, 189)
VISIBLE_WHITESPACE = str.maketrans({"\n": "↵", "\t": "→", "\r": "␍"})


@dataclass
class TokenView:
    """One response token: its id, the tokenizer's token string, the characters it adds, its span (-1: none)."""

    id: int
    piece: str
    text: str
    start: int
    end: int
    span: int
    special: bool


@dataclass
class SideView:
    tokenizer: str
    tokens: list[TokenView]

    @property
    def n_tokens(self) -> int:
        """Response tokens that are not special (EOS is not text)."""
        return sum(not t.special for t in self.tokens)

    def span_sizes(self, num_spans: int) -> list[int]:
        sizes = [0] * num_spans
        for token in self.tokens:
            if token.span >= 0:
                sizes[token.span] += 1
        return sizes


@dataclass
class SpanView:
    """One record's response as both tokenizers split it, with the shared spans; `prompt` is the record's prompt
    (chat turns as "role: content" lines; "" for --text), shown but not spanned."""

    label: str
    response: str
    student: SideView
    teacher: SideView
    num_spans: int
    prompt: str = ""


def _side_view(side, tokenizer: PreTrainedTokenizerBase, ids, response: str) -> SideView:
    start = side.response_start
    pieces = tokenizer.convert_ids_to_tokens(side.input_ids[start:])
    tokens, reach = [], 0
    for index, piece in zip(range(start, len(side.input_ids)), pieces):
        begin, end = (int(x) for x in side.offsets[index])
        special = bool(side.special[index])
        text = piece if special else response[reach:end]  # the gap before it too: trimmed spaces (GPT-NeoX)
        if not special:
            reach = max(reach, end)
        tokens.append(TokenView(int(side.input_ids[index]), piece, text, begin, end, int(ids[index]), special))
    return SideView(str(tokenizer.name_or_path), tokens)


def view_record(
    record: Record,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    max_length: int = 512,
    max_prompt_length: int = 256,
    label: str | None = None,
) -> SpanView:
    """Pair one record as training does and read off both tokenizations and their spans."""
    example = pair_example(record, student_tokenizer, teacher_tokenizer, max_length, max_prompt_length)
    s, t = example.student, example.teacher
    s_ids, t_ids, num_spans = example_span_ids(example)
    response = example.response  # the text the offsets index (pairing normalises it to NFC)
    prompt = record.prompt if record.prompt is not None else "\n".join(
        f"{m['role']}: {m['content']}" for m in record.messages or [])
    return SpanView(
        label or f"{record.source} line {record.line}",
        response,
        _side_view(s, student_tokenizer, s_ids, response),
        _side_view(t, teacher_tokenizer, t_ids, response),
        num_spans,
        prompt,
    )


def text_record(text: str) -> Record:
    """A record whose response is `text` (empty prompt), for `--text`."""
    if not text:
        raise ConfigError("--text is empty; give the text whose spans to show")
    return Record(prompt="", response=text, references=[text], messages=None, source="--text", line=1)


def span_statistics(views: list[SpanView]) -> dict:
    """Token, span and multi-token-span counts over `views` (see the module docstring for the ratios)."""
    spans = sum(v.num_spans for v in views)
    stats: dict = {"records": len(views), "spans": spans}
    multi_either = 0
    for name in ("student", "teacher"):
        sides = [getattr(v, name) for v in views]
        tokens = sum(side.n_tokens for side in sides)
        multi = sum(size > 1 for v, side in zip(views, sides) for size in side.span_sizes(v.num_spans))
        outside = sum(t.span < 0 and not t.special for side in sides for t in side.tokens)
        stats[name] = {
            "tokenizer": sides[0].tokenizer if sides else None,
            "tokens": tokens,
            "tokens_outside_spans": outside,
            "spans_per_token": spans / tokens if tokens else 0.0,
            "multi_token_spans": multi,
            "multi_token_share": multi / spans if spans else 0.0,
        }
    for v in views:
        s_sizes, t_sizes = v.student.span_sizes(v.num_spans), v.teacher.span_sizes(v.num_spans)
        multi_either += sum(a > 1 or b > 1 for a, b in zip(s_sizes, t_sizes))
    stats["multi_token_spans_either_side"] = multi_either
    stats["multi_token_share_either_side"] = multi_either / spans if spans else 0.0
    return stats


# ---------------------------------------------------------------------------------------------------- terminal
def _shown(token: TokenView) -> str:
    return (token.text or EMPTY_TOKEN).translate(VISIBLE_WHITESPACE)


def render_side_terminal(side: SideView, color: bool) -> str:
    """One tokenization on one line. Colour: span k on background k mod 6, tokens of a span split by a thin mark,
    tokens in no span dim. Plain: spans in brackets, tokens split by '|', tokens in no span bare."""
    out, previous = [], None
    for token in side.tokens:
        same_span = token.span >= 0 and token.span == previous
        if color:
            if token.span < 0:
                out.append(f"\x1b[2m{_shown(token)}\x1b[0m")
            else:
                background = TERMINAL_BACKGROUNDS[token.span % len(TERMINAL_BACKGROUNDS)]
                mark = TOKEN_MARK if same_span else ""
                out.append(f"\x1b[30;48;5;{background}m{mark}{_shown(token)}\x1b[0m")
        else:
            if previous is not None and previous >= 0 and not same_span:
                out.append("]")
            out.append(("|" if same_span else "[" if token.span >= 0 else " ") + _shown(token))
        previous = token.span
    if not color and previous is not None and previous >= 0:
        out.append("]")
    return "".join(out)


def render_terminal(views: list[SpanView], stats: dict, overlap: dict | None, color: bool) -> str:
    lines = []
    width = max(len(views[0].student.tokenizer), len(views[0].teacher.tokenizer)) if views else 0
    for view in views:
        lines.append(f"== {view.label}: {view.num_spans} spans ==")
        for role, side in (("student", view.student), ("teacher", view.teacher)):
            lines.append(f"{role} {side.tokenizer:<{width}} ({side.n_tokens:>4} tokens): "
                         f"{render_side_terminal(side, color)}")
        lines.append("")
    lines.append(statistics_text(stats, overlap))
    return "\n".join(lines)


def statistics_text(stats: dict, overlap: dict | None) -> str:
    lines = [f"{stats['records']} record(s), {stats['spans']} spans; "
             f"multi-token spans on either side: {stats['multi_token_spans_either_side']} "
             f"({100 * stats['multi_token_share_either_side']:.1f}%)"]
    for role in ("student", "teacher"):
        s = stats[role]
        lines.append(f"  {role} {s['tokenizer']}: {s['tokens']} tokens, {s['spans_per_token']:.3f} spans/token, "
                     f"{s['multi_token_spans']} multi-token spans ({100 * s['multi_token_share']:.1f}%), "
                     f"{s['tokens_outside_spans']} tokens outside spans")
    if overlap:
        lines.append(f"  shared vocabulary: exact {overlap['exact']}, normalised {overlap['normalized']} "
                     f"(student {overlap['student_vocab']}, teacher {overlap['teacher_vocab']} tokens)")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- html
def span_color(span: int) -> str:
    """The same light colour for span k on both sides; golden-angle hues keep neighbouring spans apart."""
    return f"hsl({(span * 137.508) % 360:.1f}, 75%, 82%)"


def _html_side(side: SideView, example: int) -> str:
    cells = []
    for token in side.tokens:
        title = f"id {token.id} | {token.piece!r} | chars {token.start}-{token.end} | " + (
            f"span {token.span}" if token.span >= 0 else "no span")
        style = f' style="background:{span_color(token.span)}"' if token.span >= 0 else ""
        css = "tok" if token.span >= 0 else "tok none"
        # The id and character range ride along hidden; the "show token ids" checkbox reveals them (CSS only).
        meta = f'<span class="meta">{token.id}<br>{token.start}–{token.end}</span>'
        cells.append(f'<span class="{css}" data-ex="{example}" data-span="{token.span}" title="{html.escape(title)}"'
                     f"{style}>{html.escape(_shown(token))}{meta}</span>")
    return "".join(cells)


_HTML_HEAD = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; line-height: 1.45; }}
.pair {{ display: grid; grid-template-columns: 1fr 1fr; gap: 1em; margin-bottom: 1.5em; }}
.side {{ font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9; border: 1px solid #ccc;
  padding: .5em; }}
.tok {{ border-right: 1px solid #666; padding: 1px 0; }}
.tok.none {{ color: #888; border: 1px dashed #999; }}
.tok.hit {{ outline: 2px solid #000; }}
.meta {{ display: none; font-size: .65em; line-height: 1.15; color: #333; text-align: center; }}
#show-ids:checked ~ .record .tok {{ display: inline-flex; flex-direction: column; align-items: center;
  vertical-align: top; margin-bottom: .2em; }}
#show-ids:checked ~ .record .meta {{ display: block; }}
.legend {{ border: 1px solid #ccc; background: #fafafa; padding: .3em 1em; margin-bottom: 1em; max-width: 70em; }}
.legend dt {{ float: left; clear: left; width: 6.5em; font-family: ui-monospace, monospace; line-height: 1.9; }}
.legend dd {{ margin: 0 0 .4em 7.5em; }}
.input {{ background: #f6f6f6; padding: .5em; white-space: pre-wrap; margin: .3em 0; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: .2em .6em; text-align: right; }}
</style></head><body>
"""
_HTML_LEGEND = f"""<div class="legend"><p>Each record's response is split by both tokenizers, as training splits it
(the student on the left, the teacher on the right). A <b>span</b> is a stretch of text that both tokenizations
cut at the same places; SRA aligns the student's and the teacher's span vectors. Only the response is spanned.</p>
<dl>
<dt><span class="tok" style="background:{span_color(0)}">&nbsp;one</span><span class="tok"
 style="background:{span_color(1)}">&nbsp;two</span></dt>
<dd><b>Colour</b>: one span. Span k has the same colour on both sides; hover a token to outline its span on
both sides.</dd>
<dt><span class="tok" style="background:{span_color(2)}">&nbsp;un</span><span class="tok"
 style="background:{span_color(2)}">bel</span><span class="tok" style="background:{span_color(2)}">iev</span></dt>
<dd><b>Thin line</b> at a token's right edge: a token boundary. Several tokens in one colour: a span of several
tokens on that side (one token on the other side, or a different split).</dd>
<dt><span class="tok" style="background:{span_color(3)}">{EMPTY_TOKEN}</span></dt>
<dd><b>{EMPTY_TOKEN}</b>: a token that adds no character of its own, e.g. a byte piece of a character that an
earlier token already shows (byte-level tokenizers may split one character into several byte tokens).</dd>
<dt><span class="tok none">&lt;/s&gt;</span></dt>
<dd><b>Dashed grey box</b>: a token in no span. The end-of-sequence token (EOS, shown by its token string) that
training appends to every response, other special tokens, and the text after the last cut both sides share.</dd>
<dt>↵</dt><dd>A newline (→ a tab, ␍ a carriage return). A leading space belongs to its token (" two").</dd>
</dl></div>
<input type="checkbox" id="show-ids"><label for="show-ids"> show token ids and character ranges (also in each
token's tooltip)</label>
"""
_HTML_SCRIPT = """<script>
// Hovering a token outlines its whole span on both sides.
document.querySelectorAll('.tok').forEach(t => {
  const mates = () => document.querySelectorAll(
    `.tok[data-ex="${t.dataset.ex}"][data-span="${t.dataset.span}"]:not(.none)`);
  t.addEventListener('mouseenter', () => mates().forEach(m => m.classList.add('hit')));
  t.addEventListener('mouseleave', () => mates().forEach(m => m.classList.remove('hit')));
});
</script></body></html>
"""


def _html_input(view: SpanView) -> str:
    """The record's text as given: the prompt collapsed (not spanned), the response that both sides split."""
    e = html.escape
    prompt = (f"<details><summary>prompt ({len(view.prompt)} characters, not spanned)</summary>"
              f"<div class=\"input\">{e(view.prompt)}</div></details>") if view.prompt else ""
    return (f"{prompt}<div><b>response</b> (the text both tokenizers split):"
            f"<div class=\"input\">{e(view.response)}</div></div>")


def render_html(views: list[SpanView], stats: dict, overlap: dict | None) -> str:
    """A self-contained page: a legend of what the marks mean, then per record its text and both tokenizations
    side by side (span k in the same colour on both sides; token ids and character ranges behind a checkbox and in
    the tooltips), then the statistics."""
    title = "Aligned spans"
    if views:
        title += f": {views[0].student.tokenizer} (student) vs {views[0].teacher.tokenizer} (teacher)"
    parts = [_HTML_HEAD.format(title=html.escape(title)), f"<h1>{html.escape(title)}</h1>", _HTML_LEGEND]
    for index, view in enumerate(views):
        parts.append(f"<div class=\"record\"><h3>{html.escape(view.label)}: {view.num_spans} spans</h3>"
                     f"{_html_input(view)}<div class=\"pair\">")
        for role, side in (("student", view.student), ("teacher", view.teacher)):
            parts.append(f"<div><b>{role}: {html.escape(side.tokenizer)}</b> ({side.n_tokens} tokens)"
                         f"<div class=\"side\">{_html_side(side, index)}</div></div>")
        parts.append("</div></div>")
    parts.append("<h2>Statistics</h2><table><tr><th></th><th>tokens</th><th>spans/token</th>"
                 "<th>multi-token spans</th><th>share</th><th>tokens outside spans</th></tr>")
    for role in ("student", "teacher"):
        s = stats[role]
        parts.append(f"<tr><th>{role}: {html.escape(str(s['tokenizer']))}</th><td>{s['tokens']}</td>"
                     f"<td>{s['spans_per_token']:.3f}</td><td>{s['multi_token_spans']}</td>"
                     f"<td>{100 * s['multi_token_share']:.1f}%</td><td>{s['tokens_outside_spans']}</td></tr>")
    parts.append("</table>")
    parts.append(f"<p>{stats['records']} record(s), {stats['spans']} spans; multi-token on either side: "
                 f"{stats['multi_token_spans_either_side']} ({100 * stats['multi_token_share_either_side']:.1f}%)."
                 "</p>")
    if overlap:
        parts.append(f"<p>Shared vocabulary: exact {overlap['exact']}, normalised {overlap['normalized']} "
                     f"(student {overlap['student_vocab']}, teacher {overlap['teacher_vocab']} tokens).</p>")
    parts.append(_HTML_SCRIPT)
    return "".join(parts)


# --------------------------------------------------------------------------------------------------------- CLI
def _tokenizer(name: str, option: str) -> PreTrainedTokenizerBase:
    try:
        return load_tokenizer(name)
    except NotFoundError as err:  # its message names what is accepted (and SRA_DATA_ROOT): add the option
        raise NotFoundError(f"{option}: {err}") from None


def run_spans(args: argparse.Namespace) -> int:
    if args.max_records < 1:
        raise ConfigError(f"--max-records must be >= 1, got {args.max_records}")
    student = _tokenizer(args.student_tokenizer, "--student-tokenizer")
    teacher = _tokenizer(args.teacher_tokenizer, "--teacher-tokenizer")
    records = [text_record(args.text)] if args.text is not None else load_records(args.data, limit=args.max_records)
    if not records:
        raise DataError(f"{args.data}: no records with a non-empty response")
    views = [view_record(r, student, teacher, args.max_length, args.max_prompt_length,
                         label="text" if args.text is not None else None) for r in records]
    stats = span_statistics(views)
    overlap = overlap_report(student, teacher)
    color = not args.no_color and "NO_COLOR" not in os.environ and sys.stdout.isatty()
    print(render_terminal(views, stats, overlap, color))
    if args.html:
        path = Path(args.html)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_html(views, stats, overlap), encoding="utf-8")
        print(f"wrote {path}")
    return 0
