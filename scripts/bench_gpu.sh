#!/usr/bin/env bash
# Every GPU benchmark of docs/benchmarks.md in one command, on a CUDA machine. Installs and downloads nothing: the
# models are full-size architectures with random weights, built in code (scripts/bench_gpu.py).
#
#   bash scripts/bench_gpu.sh                   # sd15 sdxl flux qwen-image, then http (the server benchmarks)
#   bash scripts/bench_gpu.sh sd15 http         # a subset; each step fits a 10-minute slot on an H100
#   BENCH_GPU_ARGS="--compile off" bash scripts/bench_gpu.sh flux    # extra options for scripts/bench_gpu.py
#
# Results go to $OUT (default bench-results/<timestamp>): bench_gpu_<model>.{json,txt}, bench_http.{json,txt},
# gpu.txt. The random SD1.5 folder the http step serves (about 2 GB) goes to $BENCH_WORK (default /tmp/easel-bench).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
export HF_HUB_OFFLINE=1

OUT="${OUT:-bench-results/$(date +%Y%m%d-%H%M%S)}"
WORK="${BENCH_WORK:-${TMPDIR:-/tmp}/easel-bench}"
mkdir -p "$OUT" "$WORK"

python - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("bench_gpu.sh: no CUDA device here (the harness alone: python scripts/bench_gpu.py --tiny)")
EOF
{ nvidia-smi || true; python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } \
    >"$OUT/gpu.txt" 2>&1

steps=("$@")
if [ ${#steps[@]} -eq 0 ]; then
    steps=(sd15 sdxl flux qwen-image http)
fi
for step in "${steps[@]}"; do
    case "$step" in
    sd15 | sdxl | flux | qwen-image)
        # shellcheck disable=SC2086  # BENCH_GPU_ARGS is a list of options
        python scripts/bench_gpu.py --models "$step" --json-out "$OUT/bench_gpu_$step.json" ${BENCH_GPU_ARGS:-} \
            2>&1 | tee "$OUT/bench_gpu_$step.txt"
        ;;
    http)
        # Overhead (target <= 1.03) and batching (target >= 2x) through the real server, full-size SD1.5 512x512.
        if [ ! -f "$WORK/sd15-random/models.yaml" ]; then
            python scripts/bench_gpu.py --save-sd15 "$WORK/sd15-random"
        fi
        python scripts/bench.py --models "$WORK/sd15-random/models.yaml" --model bench-sd15 \
            --size 512 --steps 20 --n 20 --k 32 --rounds 2 --data-dir "$WORK/data" \
            --json-out "$OUT/bench_http.json" 2>&1 | tee "$OUT/bench_http.txt"
        ;;
    *)
        echo "bench_gpu.sh: unknown step '$step' (known: sd15 sdxl flux qwen-image http)" >&2
        exit 2
        ;;
    esac
done
echo "results: $OUT"
