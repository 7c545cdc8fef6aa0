#!/usr/bin/env bash
# One-shot check for a machine with one CUDA GPU, in under 8 minutes, offline, with random weights:
#   1. the CUDA-relevant checks (benchmarks/device_checks.py): lean attention rows against eager maps, SRA's span KL
#      in bf16, one tiny distillation step with precision=bf16;
#   2. benchmarks/step_cost.py at paper scale: random Qwen1.5-1.8B-shaped bf16 teacher, GPT-2 120M student, 8x512,
#      rows floor, sra, sra_authors (the authors' way), uld, dskd, mined and the teacher-cache rows sra_cached,
#      uld_cached, mined_cached; absolute s/step and peak GB next to the
#      paper's cost table.
# Needs torch, transformers, accelerate and peft; rapidfuzz only for the mined row (reported, not fatal, if absent).
# Reads tokenizers from TOKENIZERS_DIR (a copy of the data root's tokenizers/); training text comes from this
# repository's own prose (benchmarks/offline_data_root.py). No network, no model files.
#
#   bash benchmarks/gpu_check.sh [--device cuda|cpu] [--tiny] [--out DIR] TOKENIZERS_DIR
#
# --tiny: tiny model shapes and a 2x32 batch (the CI smoke run: `--device cpu --tiny`, a minute or two).
# Results go to --out (default benchmarks/results/gpu_check_<device>[_tiny]): device_checks.txt, step_cost.txt,
# step_cost.json, environment.txt. Exit status: 0 when every check and row passed.
set -uo pipefail
cd "$(dirname "$0")/.."

device=cuda
tiny=0
out=""
tokenizers=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --tiny) tiny=1; shift ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
    *) tokenizers="$1"; shift ;;
  esac
done
if [ -z "$tokenizers" ] || [ ! -d "$tokenizers" ]; then
  echo "gpu_check: give TOKENIZERS_DIR, a folder holding gpt2/, qwen1.5/, llama2/, smollm2-135m-instruct/ ..." >&2
  exit 2
fi
suffix=""; [ "$tiny" = 1 ] && suffix="_tiny"
out="${out:-benchmarks/results/gpu_check_${device}${suffix}}"
mkdir -p "$out"
python="${PYTHON:-python}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
work="$(mktemp -d)"
mined_pid=""
cleanup() { [ -n "$mined_pid" ] && kill "$mined_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
started=$(date +%s)
status=0

echo "== environment"
"$python" - <<'PY' | tee "$out/environment.txt" || { echo "gpu_check: torch/transformers/accelerate/peft missing" >&2; exit 2; }
import importlib.util, platform
import torch, transformers, accelerate, peft
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"accelerate {accelerate.__version__}, peft {peft.__version__}")
print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
      f"(CUDA {torch.version.cuda})" if torch.cuda.is_available() else "")
optional = {name: importlib.util.find_spec(name) is not None for name in ("rapidfuzz", "rouge_score", "gguf", "pytest")}
print("optional packages:", ", ".join(f"{k} {'present' if v else 'absent'}" for k, v in optional.items()))
PY

"$python" benchmarks/offline_data_root.py "$tokenizers" "$work/data" || exit 2
export SRA_DATA_ROOT="$work/data"

if [ "$tiny" = 1 ]; then
  models=paper-tiny; cost_args=(--seq-len 32 --batch-size 2 --warmup 0 --steps 1 --row-timeout 300 --threads 1)
else
  models=paper; cost_args=(--seq-len 512 --batch-size 8 --warmup 2 --steps 5 --row-timeout 150)
fi
# MinED's vocabulary map (edit distance over the whole teacher vocabulary) is cached on disk; build it now, on the
# CPU, while the device checks use the GPU, so the mined row does not pay for it.
if "$python" -c "import rapidfuzz" 2>/dev/null; then
  "$python" benchmarks/step_cost.py --models "$models" --prepare-only > "$out/prepare.txt" 2>&1 &
  mined_pid=$!
fi

echo "== device checks ($device)"
"$python" benchmarks/device_checks.py --device "$device" 2>&1 | grep -v "^\[transformers\]" | tee "$out/device_checks.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

if [ -n "$mined_pid" ]; then
  echo "== waiting for MinED's vocabulary map"
  wait "$mined_pid" || echo "MinED map preparation failed (see $out/prepare.txt); the mined row will try again"
  mined_pid=""
fi

echo "== step cost ($models, $device)"
"$python" benchmarks/step_cost.py --models "$models" --device "$device" --keep-going "${cost_args[@]}" \
  --json "$out/step_cost.json" 2>&1 | tee "$out/step_cost.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

elapsed=$(( $(date +%s) - started ))
echo "== gpu_check: $([ $status = 0 ] && echo PASSED || echo FAILED) in ${elapsed} s; results in $out" \
  | tee -a "$out/environment.txt"
exit $status
