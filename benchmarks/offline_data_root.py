"""A data root for machines without the shared data: the given tokenizers/ folder, and training text from this
repository's own prose (markdown files and module docstrings) as Alpaca-style records in dolly/train.jsonl and
dolly/dev.jsonl. Enough for cost measurements and smoke steps (benchmarks/gpu_check.sh); not a training set.

    python benchmarks/offline_data_root.py TOKENIZERS_DIR ROOT      # then SRA_DATA_ROOT=ROOT
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECORDS = 800  # step_cost reads up to 64 records per example of its batch (8 examples)


def paragraphs() -> list[str]:
    """Blocks of prose (at least 200 characters) from the repository's markdown files and module docstrings."""
    texts = [path.read_text(encoding="utf-8") for path in sorted(REPO.glob("**/*.md")) if ".venv" not in path.parts]
    for path in sorted((REPO / "src").glob("**/*.py")):
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        if docstring:
            texts.append(docstring)
    blocks = [block.strip() for text in texts for block in text.split("\n\n")]
    return [block for block in blocks if len(block) >= 200]


def write_root(tokenizers: Path, root: Path) -> int:
    if not tokenizers.is_dir() or not any(tokenizers.iterdir()):
        raise SystemExit(f"{tokenizers}: not a folder of tokenizers (expected gpt2/, qwen1.5/, llama2/, ...)")
    root.mkdir(parents=True, exist_ok=True)
    link = root / "tokenizers"
    if not link.exists():
        link.symlink_to(tokenizers.resolve(), target_is_directory=True)
    blocks = paragraphs()
    if not blocks:
        raise SystemExit(f"no prose found under {REPO} to build records from")
    (root / "dolly").mkdir(exist_ok=True)
    for name, count in (("train.jsonl", RECORDS), ("dev.jsonl", 32)):
        with (root / "dolly" / name).open("w", encoding="utf-8") as out:
            for index in range(count):
                block = blocks[index % len(blocks)]
                instruction = f"Explain note {index} of the sra-distill documentation in your own words."
                out.write(json.dumps({"instruction": instruction, "input": "", "output": block}) + "\n")
    return len(blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokenizers", type=Path)
    parser.add_argument("root", type=Path)
    args = parser.parse_args()
    count = write_root(args.tokenizers, args.root)
    print(f"data root {args.root}: tokenizers -> {args.tokenizers}, dolly/ from {count} blocks of repository prose",
          file=sys.stderr)


if __name__ == "__main__":
    main()
