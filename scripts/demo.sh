#!/usr/bin/env bash
# Fresh machine -> offline demo: set up, then evaluate the embedded tiny testbed with lmms-eval
# for reduction=none and Simignore (drop and mask) and print one table. Extra arguments go to
# `python -m lmms_simignore demo` (e.g. --workdir DIR --num-docs 48).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py="$([ "${VENV:-.venv}" = system ] && echo "${PYTHON:-python3}" || echo "${VENV:-.venv}/bin/python")"
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 exec "$py" -m lmms_simignore demo "$@"
