#!/usr/bin/env bash
# Set up lmms-simignore with lmms-eval in a virtual environment (default: ./.venv), then prove that it
# can evaluate (a seconds-long real lmms-eval run of the shipped model; setup fails if it cannot).
#
#   bash scripts/setup.sh          # the tested lock (requirements/lock-py311-cpu.txt), test tools included
#   bash scripts/setup.sh test     # the same (kept for LOCK=0, where it adds the test extras)
#
# LOCK=1        (default) install exactly the locked versions, nothing resolved on the day
# LOCK=0        resolve the newest versions that pyproject.toml's bounds allow instead (untested combinations)
# VENV=path     where the environment goes; VENV=system installs into the current python instead
# PYTHON=...    interpreter used to create the environment (default: python3)
# TORCH_SPEC=.. TORCHVISION_SPEC=..  the torch / torchvision pair, used only when no torch imports yet
#               (default: the lock's, torch==2.14.1 and torchvision==0.29.1, installed together)
# TORCH_INDEX_URL=..  package index for that pair only (default: pip's own). PyPI's torch for Linux is a
#               CUDA build (it runs on a CPU-only machine too); PyTorch's CPU index is smaller:
#               TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# CHECK=0       skip the final evaluation check
#
# A torch that already imports is kept as it is (a GPU user's CUDA build and its torchvision stay); the
# lock's torchvision is added to it only when it is the lock's torch release.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
lock_file="requirements/lock-py311-cpu.txt"
venv="${VENV:-.venv}"
if [ "$venv" = "system" ]; then
    py="${PYTHON:-python3}"
else
    [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
    py="$venv/bin/python"
fi
pip_install() { "$py" -m pip install --disable-pip-version-check -q "$@"; }
locked_torch="$(grep -E '^torch==' "$lock_file")"
locked_torchvision="$(grep -E '^torchvision==' "$lock_file")"
pins="$(mktemp)"
trap 'rm -f "$pins"' EXIT
if [ "${LOCK:-1}" = "1" ]; then
    grep -vE '^torch(vision)?==' "$lock_file" > "$pins"  # the torch pair is installed (or kept) on its own, below
else
    : > "$pins"
fi
installed_torch() { "$py" -c "from importlib.metadata import version; print('torch==' + version('torch').split('+')[0])"; }

if "$py" -c "import torch" >/dev/null 2>&1; then
    echo "setup: keeping the installed $(installed_torch)"
    if ! "$py" -c "import torchvision" >/dev/null 2>&1 && [ "$(installed_torch)" = "$locked_torch" ]; then
        echo "setup: adding $locked_torchvision, the lock's torchvision for $locked_torch"
        pip_install --no-deps ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$locked_torchvision"
    fi
else
    torch_spec="${TORCH_SPEC:-$locked_torch}" torchvision_spec="${TORCHVISION_SPEC:-$locked_torchvision}"
    echo "setup: installing $torch_spec and $torchvision_spec${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
    pip_install -c "$pins" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$torch_spec" "$torchvision_spec"
fi
torch_kept="$(installed_torch)"

if [ "${LOCK:-1}" = "1" ]; then
    "$py" -c "import sys; sys.exit(sys.version_info[:2] != (3, 11))" \
        || echo "setup: warning: the lock was tested on Python 3.11, this is $("$py" -V 2>&1); if a pin has no wheel here, use LOCK=0"
    echo "setup: installing the tested lock ($lock_file: $(grep -cE '^[^#]' "$pins") packages besides torch) and lmms-simignore"
    pip_install --no-deps -r "$pins"
    pip_install --no-deps --no-build-isolation -e .
else
    echo "$torch_kept" > "$pins"
    echo "setup: LOCK=0: resolving the newest versions the bounds allow for lmms-simignore${extras:+[$extras]} and lmms-eval"
    pip_install -c "$pins" -e ".${extras:+[$extras]}"
fi

# A torchvision that does not import next to the kept torch (another release's, or PyPI's next to a CPU
# build) breaks transformers' image processors for every model, so it goes; without one, LLaVA-1.5 and
# Mipha still run and the Qwen-VL, OneVision and InternVL classes say what to install. timm (lmms-eval
# requires it, nothing here imports it) goes too when it cannot import.
for module in torchvision timm; do
    if "$py" -m pip show -q "$module" >/dev/null 2>&1 && ! "$py" -c "import $module" >/dev/null 2>&1; then
        echo "setup: removing $module $("$py" -m pip show "$module" 2>/dev/null | sed -n 's/^Version: //p'): it does not import next to $torch_kept"
        "$py" -m pip uninstall -y -q "$module"
    fi
done
if ! "$py" -c "import torchvision" >/dev/null 2>&1; then
    echo "setup: warning: no torchvision imports next to $torch_kept; the Qwen-VL, OneVision and InternVL processors need the torchvision release made for it"
fi

if [ "${CHECK:-1}" = "1" ]; then
    echo "setup: checking that lmms-eval can evaluate (the shipped model on 2 questions)"
    if ! HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "$py" -m lmms_simignore selfcheck --lock "$lock_file"; then
        echo "setup: FAILED: this environment cannot run an lmms-eval evaluation (see above)" >&2
        exit 1
    fi
fi
echo "setup: ready ($py)"
