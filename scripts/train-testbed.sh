#!/usr/bin/env bash
# The shipped testbed model, shapes-llava, from nothing: LLaVA-1.5's recipe scaled down, every stage one
# command (see lmms_simignore/testbed/shapes-llava/README.md for what each stage is and what it measured).
# Usage: bash scripts/train-testbed.sh [WORKDIR]   (default: outputs/train-testbed; stages already in
# WORKDIR, i.e. with their training.json, are kept, so a killed run resumes at the stage it was in).
# Each stage trains on cuda when available, else on the CPU (the stages took 2 h 16 min on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
py="$([ "${VENV:-.venv}" = system ] && echo "${PYTHON:-python3}" || echo "${VENV:-.venv}/bin/python")"
work="${1:-outputs/train-testbed}"
mkdir -p "$work"
export HF_HUB_OFFLINE=1

stage() {  # stage OUT_NAME COMMAND ARGS...: run `python -m lmms_simignore COMMAND ARGS --out WORKDIR/OUT_NAME` once
  local out="$work/$1"
  shift
  if [ -f "$out/training.json" ]; then
    echo "== $out: done before, kept"
    return
  fi
  echo "== $out: python -m lmms_simignore $*"
  "$py" -m lmms_simignore "$@" --out "$out"
}

# a CLIP-like vision tower (scene captions + object phrases) and a language model of scene text
stage tower pretrain-tower
stage lm pretrain-lm
# stage 1, feature alignment: only the projector trains, on captions
stage stage1 align-projector --tower "$work/tower" --lm "$work/lm" --steps 1000
# stage 2, instruction tuning: projector and language model on the shapes questions, in five runs
stage stage2-a tune-instructions --init-from "$work/stage1" --steps 3000
stage stage2-b tune-instructions --init-from "$work/stage2-a" --steps 3000 --seed 2 --lr 5e-4 --curriculum 0 \
  --mix colour,shape,exists,count,spatial,spatial
# left-of sits at chance until it is trained alone on scenes with few objects first
stage stage2-c tune-instructions --init-from "$work/stage2-b" --steps 500 --lr 5e-4 --seed 4 --curriculum 1 \
  --mix spatial --eval-every 100
stage stage2-d tune-instructions --init-from "$work/stage2-c" --steps 1500 --lr 5e-4 --seed 5 --curriculum 0 \
  --mix colour,shape,exists,count,spatial,spatial,spatial
stage shapes-llava tune-instructions --init-from "$work/stage2-d" --steps 3000 --lr 4e-4 --seed 6 --curriculum 0 \
  --mix colour,shape,exists,exists,count,spatial,spatial --eval-every 500
echo "== the model: $work/shapes-llava (held-out accuracy in its training.json)"
