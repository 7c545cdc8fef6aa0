"""A page as a list of blocks, rendered to markdown or to one self-contained HTML file: the parts that `sra report`
and the model cards share (the training summary of `metrics.jsonl`, the tables of every `scores.json`)."""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from markdown_it import MarkdownIt

# CommonMark without raw HTML: text that looks like a tag is shown, never interpreted (a prompt may hold "<b>").
_MARKDOWN = MarkdownIt("commonmark", {"html": False})


@dataclass
class Block:
    """One piece of a page. kind: h1, h2, p, code, table (header + rows), image (path), sample (fields), details
    (a collapsed section: `text` is its one-line summary, `children` its blocks). Text of h1, h2, p, table cells and
    the details summary is markdown (`code`, **bold**), rendered as such in the HTML."""

    kind: str
    text: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    path: Path | None = None
    fields: dict[str, str] = field(default_factory=dict)
    children: list[Block] = field(default_factory=list)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def training_summary(rows: list[dict]) -> list[list[str]]:
    """[name, value] rows summarising metrics.jsonl rows: steps, skipped steps, first/last loss and components,
    best dev ROUGE-L (the report's and the model card's training table)."""
    good = [r for r in rows if not r.get("skipped")]
    dev = [(r["step"], r["dev_rouge_l"]) for r in rows if "dev_rouge_l" in r]
    summary = [
        ["steps logged", str(len(rows))],
        ["last step", str(rows[-1]["step"])],
        ["skipped steps (non-finite loss)", str(len(rows) - len(good))],
    ]
    if good:
        summary += [["first loss", _fmt(good[0]["loss"])], ["last loss", _fmt(good[-1]["loss"])]]
        components = [k for k in good[-1] if k not in ("loss", "step", "epoch", "skipped", "world_size")
                      and isinstance(good[-1][k], float)]
        summary += [[f"last {k}", _fmt(good[-1][k])] for k in components]
    if dev:
        best_step, best = max(dev, key=lambda d: d[1])
        summary.append(["best dev ROUGE-L", f"{best:.2f} (step {best_step})"])
    return summary


def _score_table(scores: dict) -> Block:
    seeds = scores["protocol"]["seeds"]
    header = ["set", "n", *[f"seed {s}" for s in seeds], "mean", "std"]
    rows = [[name, str(s["n_examples"]), *[f"{v:.2f}" for v in s["per_seed"]], f"{s['mean']:.2f}", f"{s['std']:.2f}"]
            for name, s in scores["sets"].items()]
    rows.append(["average", "", *[""] * len(seeds), f"{scores['average']:.2f}", ""])
    return Block("table", header=header, rows=rows)


def evaluation_blocks(out: Path) -> tuple[list[Block], list[Path]]:
    """The evaluation section: one table per `scores.json` below `out`, and the `predictions.jsonl` beside them."""
    blocks = [Block("h2", "Evaluation (ROUGE-L x100)")]
    files = sorted(out.rglob("scores.json"))
    if not files:
        return blocks + [Block("p", "No scores.json below this directory (run `sra evaluate --model "
                                    f"{out / 'final'} --output {out / 'eval'}`).")], []
    for path in files:
        scores = json.loads(path.read_text(encoding="utf-8"))
        protocol = scores.get("protocol", {})
        blocks.append(Block("p", f"`{path.relative_to(out)}`: model `{scores.get('model')}`, "
                                 f"{'sampling' if protocol.get('do_sample') else 'greedy'}, "
                                 f"max_new_tokens {protocol.get('max_new_tokens')}."))
        blocks.append(_score_table(scores))
    return blocks, [p.parent / "predictions.jsonl" for p in files if (p.parent / "predictions.jsonl").is_file()]


def _long_field(name: str, value: str) -> bool:
    """Sample fields shown as a block of text (quoted in markdown, preformatted in HTML) rather than inline."""
    return "\n" in value or name in ("prompt", "student", "reference")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block], base: Path) -> str:
    lines = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            lines += [("# " if b.kind == "h1" else "## ") + b.text, ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "code":
            lines += ["```yaml", b.text.rstrip("\n"), "```", ""]
        elif b.kind == "table":
            lines.append("| " + " | ".join(map(_md_cell, b.header)) + " |")
            lines.append("|" + "---|" * len(b.header))
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in b.rows]
            lines.append("")
        elif b.kind == "image":
            lines += [f"![{b.text}]({b.path.relative_to(base) if b.path.is_relative_to(base) else b.path})", ""]
        elif b.kind == "sample":
            for name, value in b.fields.items():
                if _long_field(name, value):
                    lines += [f"**{name}:**", "", "> " + value.replace("\n", "\n> "), ""]
                else:
                    lines.append(f"**{name}:** {value}  ")
            lines += ["", "---", ""]  # a blank line first, or "---" would underline the line above as a heading
        elif b.kind == "details":
            # GitHub and most viewers fold this; the blank lines let the markdown inside render as markdown.
            lines += [f"<details><summary>{b.text}</summary>", "", to_markdown(b.children, base), "</details>", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    return _MARKDOWN.renderInline(text)


_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em;line-height:1.45}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left;"
    "vertical-align:top}th{background:#f3f3f3}code{background:#f3f3f3;padding:0 .2em;border-radius:3px}"
    "pre{background:#f6f6f6;padding:.8em;overflow:auto}pre code{background:none;padding:0}"
    ".sample{border-left:3px solid #9ab;padding-left:1em;margin:1em 0}.sample pre{white-space:pre-wrap}"
    "img{max-width:100%}details{margin:1em 0}summary{cursor:pointer;font-weight:600}"
)


def _html_blocks(blocks: list[Block]) -> list[str]:
    e = html.escape
    parts = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            parts.append(f"<{b.kind}>{_inline(b.text)}</{b.kind}>")
        elif b.kind == "p":
            parts.append(_MARKDOWN.render(b.text))
        elif b.kind == "code":
            parts.append(f"<pre>{e(b.text)}</pre>")
        elif b.kind == "table":
            head = "".join(f"<th>{_inline(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        elif b.kind == "image":  # embedded, so the page is one file
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            parts.append(f"<img alt=\"{e(b.text)}\" src=\"data:image/png;base64,{data}\">")
        elif b.kind == "sample":  # model text, shown as it is (not markdown); short fields on one line
            parts.append("<div class=\"sample\">" + "".join(
                f"<b>{e(name)}:</b><pre>{e(value)}</pre>" if _long_field(name, value)
                else f"<div><b>{e(name)}:</b> {e(value)}</div>" for name, value in b.fields.items()) + "</div>")
        elif b.kind == "details":
            parts.append(f"<details><summary>{_inline(b.text)}</summary>{''.join(_html_blocks(b.children))}</details>")
    return parts


def to_html(blocks: list[Block]) -> str:
    """One self-contained page (the images embedded); the first h1 is its title."""
    title = next((b.text for b in blocks if b.kind == "h1"), "Run report")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(_html_blocks(blocks))}</body></html>")
