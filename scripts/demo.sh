#!/usr/bin/env bash
# Sets up .venv if needed, then runs the embedded default: `sra distill` with no arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
sra distill "$@"
