#!/usr/bin/env bash
# Fresh machine -> test suite: set up (the tested lock, test tools included), then run pytest offline.
# Extra arguments go to pytest (e.g. -k engine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
py="$([ "${VENV:-.venv}" = system ] && echo "${PYTHON:-python3}" || echo "${VENV:-.venv}/bin/python")"
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 exec "$py" -m pytest "$@"
