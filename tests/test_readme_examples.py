"""Every page of the documentation works as printed: README.md, then docs/*.md in the order the README links them.

- Python blocks run, and what each computes is checked.
- Every line of a bash block is a known command. `sra` commands (also `python -m sra_distill`, behind `accelerate
  launch` / `torchrun`, and `bash scripts/demo.sh`, which runs `sra distill`) parse; those of `sra distill` and
  `sra config` resolve their settings and pass every check made before a model loads; repository files they name
  exist.
- The quick ones (random tiny models, `sra config`, `sra spans`, `sra vocab`) run, page after page in one folder, as a
  reader following the pages runs them: a command refused because of an earlier one's output fails. The long ones
  (real weights: the demo, the paper configs, `sra evaluate`, `sra student`) are only parsed and checked.
- The data page's JSON records parse as the formats they show; relative links and named modules resolve.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sra_distill.cli import build_parser, main
from sra_distill.config import load_config
from sra_distill.data.records import parse_record
from sra_distill.paths import resolve_config, resolve_data_path
from sra_distill.validation import validate_settings

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^([ \t]*)```(\w*)\n(.*?)^\1```", re.S | re.M)
REPO_PATHS = ("configs/", "scripts/", "benchmarks/")
OTHER_TOOLS = {".", "tensorboard", "hf"}  # the shell's `source`, and programs of other packages the pages use


def pages() -> list[Path]:
    """README.md, then the docs pages in the order its links name them, then any page it does not link."""
    linked = [ROOT / name for name in dict.fromkeys(re.findall(r"\]\((docs/[\w.-]+\.md)", README.read_text()))]
    return [README, *linked, *sorted(set((ROOT / "docs").glob("*.md")) - set(linked))]


def blocks(page: Path, language: str) -> list[str]:
    """The fenced blocks of one language on a page, dedented (a block inside a list item is indented)."""
    return [textwrap.dedent(body) for _, lang, body in FENCE.findall(page.read_text()) if lang == language]


def example_after(marker: str) -> str:
    """The first ```python block after `marker`, which must appear on exactly one page."""
    (page,) = [p for p in pages() if marker in p.read_text()]
    text = page.read_text()
    return textwrap.dedent(FENCE.search(text, text.index(marker)).group(3))


@dataclass(frozen=True)
class Command:
    """One command line of a bash block."""

    where: str  # page:line:program, for messages and test ids
    words: tuple[str, ...]

    @property
    def sra_argv(self) -> list[str] | None:
        """The `sra` arguments this line runs, or None for a line that runs no `sra` command."""
        words = list(self.words)
        if words[0] == "sra":
            return words[1:]
        if words[:2] == ["bash", "scripts/demo.sh"]:  # the script is `sra distill "$@"`
            return ["distill", *words[2:]]
        if "-m" in words and words[words.index("-m") + 1] == "sra_distill":  # python, accelerate, torchrun
            return words[words.index("-m") + 2:]
        return None


def shell_commands(body: str) -> list[tuple[int, str]]:
    """(index of its first line, text) of each command of a shell block; a line ending in a backslash goes on."""
    joined, start, pending = [], 0, ""
    for index, line in enumerate(body.splitlines()):
        start = start if pending else index
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        joined.append((start, pending + line))
        pending = ""
    return joined


def commands() -> list[Command]:
    found = []
    for page in pages():
        text = page.read_text()
        for block in FENCE.finditer(text):
            if block.group(2) != "bash":
                continue
            first = text.count("\n", 0, block.start(3)) + 1
            for index, line in shell_commands(textwrap.dedent(block.group(3))):
                words = shlex.split(line, comments=True)
                if words:
                    found.append(Command(f"{page.relative_to(ROOT)}:{first + index}:{words[0]}", tuple(words)))
    return found


def parse(argv: list[str]):
    """The parsed `sra` arguments, or None for a --help line (which argparse answers by exiting 0)."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exit_info:
        assert exit_info.code == 0, f"sra {' '.join(argv)}: argparse refused it"
        return None


def settings(args):
    """The resolved settings of a `sra distill` / `sra config` line: `--config` is a repository file (the tests run
    in another folder) or a packaged name, as `sra` resolves it."""
    if not args.config:
        return load_config(None, args.overrides)
    in_repository = ROOT / args.config
    return load_config(in_repository if in_repository.is_file() else resolve_config(args.config), args.overrides)


def is_quick(args) -> bool:
    """A command that runs in seconds: no real weights to load, no long training."""
    if args.command == "distill":
        cfg = settings(args)
        return cfg.teacher.startswith("random:") and cfg.student.startswith("random:")
    return args.command in ("config", "spans") or (args.command == "vocab" and not args.mined_map)


@pytest.mark.parametrize("command", commands(), ids=lambda c: c.where)
def test_command_parses_and_passes_the_checks(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # output folders are probed for writing here, as a reader's would be
    for word in command.words:
        if word.startswith(REPO_PATHS):
            assert (ROOT / word).exists(), f"{command.where}: {word} is not in the repository"
    argv = command.sra_argv
    if argv is None:
        if command.words[0] in ("bash", "python"):
            assert command.words[1].startswith(REPO_PATHS), f"{command.where}: runs no script of the repository"
        else:
            assert command.words[0] in OTHER_TOOLS, f"{command.where}: unknown program {command.words[0]}"
        return
    args = parse(argv)
    if args is None:
        return
    if args.command in ("distill", "config"):
        validate_settings(settings(args))
    if args.command == "compare":  # the base and every candidate are valid settings
        from sra_distill.compare import comparison_from_args
        from sra_distill.validation import check_combinations

        cmp = comparison_from_args(args)
        assert cmp.candidates, f"{command.where}: no candidates"
        for candidate in cmp.candidates:
            check_combinations(load_config(cmp.config, [*cmp.overrides, *candidate.overrides]))
    data = getattr(args, "data", None)  # sra spans: one file; sra evaluate: a list
    for value in [data] if isinstance(data, str) else data or []:
        data_file = value.partition("=")[2] or value  # sra evaluate takes NAME=FILE too
        assert resolve_data_path(data_file).is_file(), f"{command.where}: {data_file} is not a data file"


def test_other_tools_are_installed():
    """The other programs the pages run come with this project's dependencies (beside the interpreter)."""
    used = {c.words[0] for c in commands() if c.sra_argv is None and c.words[0] in OTHER_TOOLS} - {"."}
    assert used and all(shutil.which(tool, path=str(Path(sys.executable).parent)) for tool in used), used


@pytest.mark.slow
def test_quick_commands_run_in_reading_order(tmp_path, monkeypatch, capsys):
    # One folder for every page, as a reader who follows the pages in order: a second run into an earlier run's
    # output_dir is refused there (issue 29: the tracker example reused the tiny run's folder).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    quick = [c for c in commands() if c.sra_argv is not None and (args := parse(c.sra_argv)) and is_quick(args)]
    assert [c.sra_argv[0] for c in quick].count("distill") >= 2, [c.where for c in quick]
    for command in quick:
        code = main(command.sra_argv)
        last_words = capsys.readouterr().err.strip().splitlines()[-1:]  # the error line of a refused command
        assert code == 0, f"{command.where} exited {code}: {last_words}"


def test_functional_loss_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(example_after("## The functional SRA loss"), "docs functional example", "exec"), scope)
    out = scope["out"]
    assert set(out) == {"cos", "geo", "kl", "span_total"} and all(torch.isfinite(v) for v in out.values())
    assert scope["projector"].weight.grad is not None and scope["projector"].weight.grad.abs().sum() > 0
    assert "span_total" in capsys.readouterr().out


def test_align_spans_example_runs(capsys):
    scope: dict = {}
    exec(compile(example_after("## Spans of two tokenizers"), "docs align_spans example", "exec"), scope)
    text, student, teacher, spans = scope["text"], scope["student"], scope["teacher"], scope["spans"]
    ends = [student[s_end - 1][1] for _, s_end, _, _ in spans]
    assert ends == [teacher[t_end - 1][1] for _, _, _, t_end in spans] and ends[-1] == len(text)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(spans) and printed[2].startswith("'東': 2 student token(s), 1 teacher token(s)")


@pytest.mark.slow
def test_hf_trainer_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(example_after("## A drop-in `transformers.Trainer`"), "docs Trainer example", "exec"), scope)
    trainer = scope["trainer"]
    assert trainer.state.global_step == 4
    final = tmp_path / "runs" / "hf-sra" / "final"
    saved = load_file(str(final / "distill_method.safetensors"))
    for name, value in trainer.distill_method.state_dict().items():
        assert torch.equal(saved[name].to(value.device), value), name
    assert (tmp_path / "runs" / "hf-sra" / "checkpoint-2" / "distill_method.safetensors").is_file()


def test_every_python_block_is_run_by_a_test():
    tested = {example_after(marker) for marker in
              ("## The functional SRA loss", "## Spans of two tokenizers", "## A drop-in `transformers.Trainer`")}
    assert {block for page in pages() for block in blocks(page, "python")} == tested


def test_data_page_records_parse_as_their_formats():
    examples = [json.loads(block) for block in blocks(ROOT / "docs" / "data.md", "json")]
    fields = {"prompt": "prompt", "instruction": "alpaca", "messages": "chat"}
    assert sorted(next(fields[k] for k in fields if k in obj) for obj in examples) == ["alpaca", "chat", "prompt"]
    for number, obj in enumerate(examples, 1):
        record = parse_record(obj, "docs/data.md", number)
        assert record.response == (obj["messages"][-1]["content"] if "messages" in obj else obj["output"])
        assert (record.messages is not None) == ("messages" in obj)
        if "instruction" in obj:  # the Alpaca template renders both the instruction and the input
            assert obj["instruction"] in record.prompt and obj["input"] in record.prompt


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_relative_links_resolve():
    for page in pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", page.read_text())):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: link to {target}"
            if anchor and linked.suffix == ".md":
                assert anchor in heading_anchors(linked), f"{page.name}: link to {target}"


def test_named_modules_exist():
    names = {n for page in pages() for n in re.findall(r"`(sra_distill(?:\.\w+)+)", page.read_text())}
    assert "sra_distill.data.records" in names
    for name in sorted(names):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            module, _, attribute = name.rpartition(".")
            getattr(importlib.import_module(module), attribute)  # AttributeError names what is missing
