#!/usr/bin/env bash
# Fresh machine -> the main job offline: set up, then evaluate the shipped shapes model with lmms-eval
# for reduction=none and every reduction method, and print accuracy per question type and per object
# count. Extra arguments go to `python -m lmms_simignore demo` (e.g. --workdir DIR --num-questions 200).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py="$([ "${VENV:-.venv}" = system ] && echo "${PYTHON:-python3}" || echo "${VENV:-.venv}/bin/python")"
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 exec "$py" -m lmms_simignore demo "$@"
