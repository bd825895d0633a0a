#!/usr/bin/env bash
# The GPU numbers in one go of under 10 minutes: tests/test_gpu.py, then `bench --preset gpu-numbers` (the LLaVA-1.5-7B,
# Qwen2.5-VL-7B and LLaVA-1.6-7B shapes, every row; the ScienceQA-IMG-sized pass at batch 8 and 32 for none, Simignore,
# FastV, PyramidDrop, DART and VisionZip), into benchmarks/results/gpu-DATE/ with plan.txt, environment.txt,
# test_gpu.log, bench.json, bench.md, bench-progress.log and a README.md stub. Each step runs under `timeout`; the bench
# writes bench.json after every model and pass row, so a stopped run keeps what finished.
#
#   bash scripts/gpu-numbers.sh --dry-run   # the plan (every step and row, estimated seconds and sources, the total,
#                                           # the commands) from the committed H100 run; no GPU, no model built
#   bash scripts/gpu-numbers.sh             # on a GPU machine
#
# Python: $PYTHON, else .venv/bin/python, else python3; it must already import torch, transformers and lmms_eval (this
# script installs nothing: scripts/setup.sh does). OUT overrides the folder; LIMIT_S the whole run's limit (600).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
out="${OUT:-benchmarks/results/gpu-$(date +%F)}"
limit_s="${LIMIT_S:-600}"
bench=("$py" -m lmms_simignore bench --preset gpu-numbers --out "$out")

case "${1:-}" in
  --dry-run) echo "python: $py"; exec "${bench[@]}" --plan ;;
  "") ;;
  *) echo "usage: bash scripts/gpu-numbers.sh [--dry-run]" >&2; exit 2 ;;
esac

started=$(date +%s)
deadline=$((started + limit_s - 15))  # 15 s kept for the README stub
"$py" -c "import torch, transformers, lmms_eval" || { echo "gpu-numbers: $py does not import torch, transformers and lmms_eval; run scripts/setup.sh first" >&2; exit 1; }
mkdir -p "$out"
"${bench[@]}" --plan | tee "$out/plan.txt"
tests_s=$(sed -n 's/^timeout-seconds tests=//p' "$out/plan.txt")

{ date -u; nvidia-smi || echo "nvidia-smi: not found"
  "$py" -c "import platform, torch, transformers, lmms_eval; from importlib.metadata import version
print('python', platform.python_version()); print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')
print(' '.join(f'{name} {version(name)}' for name in ('transformers', 'tokenizers', 'accelerate', 'lmms_eval', 'datasets', 'numpy')))"
} > "$out/environment.txt" 2>&1

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
step() {  # step SECONDS LOG COMMAND...: the command under timeout (SIGINT first: the bench saves and cleans up), teed to LOG
  local seconds=$1 log=$2; shift 2
  local began=$(date +%s) status=0
  timeout -s INT -k 10 "$seconds" "$@" 2>&1 | tee "$log" || status=${PIPESTATUS[0]}
  echo "- \`$*\` (timeout ${seconds} s): exit ${status} after $(( $(date +%s) - began )) s" >> "$out/steps.txt"
}
: > "$out/steps.txt"
step "$tests_s" "$out/test_gpu.log" "$py" -m pytest tests/test_gpu.py -v
left=$((deadline - $(date +%s)))
step $((left > 1 ? left : 1)) "$out/bench-progress.log" "${bench[@]}"

cat > "$out/README.md" <<EOF
# GPU run, $(date +%F): $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo "no GPU")

\`scripts/gpu-numbers.sh\` (plan: \`plan.txt\`; machine and versions: \`environment.txt\`). Commands, from the repository
root, with their exit status and seconds (124 or 130: stopped by its timeout; \`bench.json\` holds what finished):

$(cat "$out/steps.txt")

Whole run: $(( $(date +%s) - started )) s. What it says: to be written from \`bench.md\`.
EOF
rm "$out/steps.txt"
echo "gpu-numbers: wrote $out"
