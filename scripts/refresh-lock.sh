#!/usr/bin/env bash
# Refresh the tested lock: resolve the newest versions that pyproject.toml's bounds allow in a fresh
# environment (LOCK=0), run the whole test suite there, and rewrite requirements/lock-py311-cpu.txt
# only if it passes. Extra arguments go to pytest. TORCH_SPEC / TORCH_INDEX_URL as for setup.sh.
#
#   bash scripts/refresh-lock.sh && git diff requirements/
set -euo pipefail
cd "$(dirname "$0")/.."
lock_file="requirements/lock-py311-cpu.txt"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
venv="$scratch/venv"

LOCK=0 VENV="$venv" bash scripts/setup.sh test
echo "refresh-lock: running the test suite on the newest allowed versions"
if ! LOCK=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" > "$scratch/pytest.log" 2>&1; then
    tail -40 "$scratch/pytest.log"
    echo "refresh-lock: the tests FAILED on these versions; $lock_file is unchanged" >&2
    exit 1
fi
summary="$(tail -1 "$scratch/pytest.log" | sed -e 's/^=* *//' -e 's/ *=*$//')"
"$venv/bin/python" -m lmms_simignore lock --write "$scratch/lock.txt" --tested-with "python -m pytest${*:+ $*} ($summary)" >/dev/null
echo "refresh-lock: tests passed ($summary); changed pins:"
diff <(grep -vE '^#' "$lock_file") <(grep -vE '^#' "$scratch/lock.txt") | grep -E '^[<>]' || echo "  (none)"
cp "$scratch/lock.txt" "$lock_file"
echo "refresh-lock: wrote $lock_file"
