#!/usr/bin/env bash
# The GPU smoke test, at most 3 minutes on an H100/H200: a real `easel serve` on CUDA (loopback) with the demo model
# of every family, txt2img / img2img / inpainting with a mask through real HTTP (tests/gpu/test_gpu_smoke.py), and
# a real out-of-memory that fails only its request (tests/gpu/test_real_oom.py, on a capped share of the card).
# Installs and downloads nothing.
#
#   bash scripts/gpu_smoke.sh               # both files
#   bash scripts/gpu_smoke.sh -k sdxl       # extra pytest options
#
# The log also goes to $OUT/gpu_smoke.txt when $OUT is set (the lent GPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# python3 where no `python` exists (a bare machine with only the system interpreter); $PYTHON overrides.
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PY
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_smoke.sh: no CUDA device here (the same routes run on CPU: pytest tests/e2e)" >&2
    exit 2
fi
LOG="${OUT:-${TMPDIR:-/tmp}}/gpu_smoke.txt"
mkdir -p "$(dirname "$LOG")"
t0=$(date +%s)
# 170 s: the whole command, server start and demo-model builds included, stays under 3 minutes.
timeout -s INT -k 10 170 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs \
    tests/gpu/test_gpu_smoke.py tests/gpu/test_real_oom.py "$@" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
echo "gpu_smoke.sh: exit $rc after $(($(date +%s) - t0)) s (log: $LOG)"
exit "$rc"
