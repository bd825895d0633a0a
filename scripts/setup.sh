#!/usr/bin/env bash
# Set up lmms-simignore with lmms-eval in a virtual environment (default: ./.venv).
#
#   bash scripts/setup.sh          # package + lmms-eval
#   bash scripts/setup.sh test     # ... plus the test dependencies
#
# VENV=path     where the environment goes; VENV=system installs into the current python instead
# PYTHON=...    interpreter used to create the environment (default: python3)
# TORCH_SPEC=.. torch requirement used only when no torch is importable (default: torch==2.13.0)
#
# A torch that already imports is kept as it is (a GPU user's CUDA build stays), and pip is told not
# to replace it. torchvision/timm builds that cannot import next to this torch (a CUDA-linked wheel on
# a CPU-only machine breaks `import transformers` image processors) are removed; working ones stay.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv="${VENV:-.venv}"
if [ "$venv" = "system" ]; then
    py="${PYTHON:-python3}"
else
    [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
    py="$venv/bin/python"
fi
pip_install() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$py" -c "import torch" 2>/dev/null; then
    echo "setup: installing ${TORCH_SPEC:-torch==2.13.0}"
    pip_install "${TORCH_SPEC:-torch==2.13.0}"
fi
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$py" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"
echo "setup: keeping $(cat "$constraints"); installing lmms-simignore${extras:+[$extras]} and lmms-eval"
pip_install -c "$constraints" -e ".${extras:+[$extras]}"

for module in torchvision timm; do
    if "$py" -m pip show -q "$module" >/dev/null 2>&1 && ! "$py" -c "import $module" >/dev/null 2>&1; then
        echo "setup: removing $module: it does not import with this torch (CUDA build on a CPU-only machine?)"
        "$py" -m pip uninstall -y -q "$module"
    fi
done
"$py" -c "import lmms_simignore, lmms_eval, transformers; from transformers import LlavaForConditionalGeneration" \
    && echo "setup: ready ($py)"
