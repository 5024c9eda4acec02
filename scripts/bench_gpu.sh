#!/usr/bin/env bash
# Issue #15's whole speed table in one command of at most 9 minutes on an H100/H200, compile time counted. Installs
# and downloads nothing: the models are full-size architectures with random weights, built in code
# (scripts/bench_gpu.py).
#
#   bash scripts/bench_gpu.sh                   # sd15 sdxl flux qwen-image http, then the summary table
#   bash scripts/bench_gpu.sh sd15 http         # a subset
#   BENCH_GPU_ARGS="--perf attention=flash" bash scripts/bench_gpu.sh flux   # extra options for bench_gpu.py
#   BENCH_TOTAL_S=900 bash scripts/bench_gpu.sh # a longer overall budget (default 540 s)
#   BENCH_TINY=1 bash scripts/bench_gpu.sh sd15 http   # this script's plumbing on CPU, tiny models (no figures)
#   BENCH_TOTAL_S=600 bash scripts/bench_gpu.sh capped  # issue #22's capped-memory rows (scripts/bench_capped.py;
#                                               # not in the default steps: FP8/GGUF at 8-48 GB caps, one process each)
#   BENCH_CAPPED_ONLY=flux bash scripts/bench_gpu.sh capped  # the capped rows whose names contain flux (comma list)
#
# Each step has a budget (seconds, below; the model steps spend theirs on more interleaved rounds and stop taking
# them when it runs out) and is interrupted at it (SIGINT: servers are stopped, partial JSON kept), so the whole run ends within BENCH_TOTAL_S. Every step prints how long
# it took. Model steps also write a torch.profiler trace of one Easel call (profile/trace_<model>.json.gz) and, for
# FLUX/Qwen-Image, the FP8 quality (relative error of the denoiser output vs bf16 on the same inputs).
#
# Results: $BENCH_RESULTS (default bench-results/<timestamp>): bench_gpu_<model>.{json,txt}, bench_http.{json,txt},
# profile/, gpu.txt, summary.{txt,json}. When $OUT is set (the lent GPU machine, which returns at most 8 files), the
# folder is also packed into $OUT/bench-results.tar.gz, with summary.txt and summary.json beside it.
# The random SD1.5 folder the http step serves (about 2 GB) and the inductor cache go to $BENCH_WORK
# (default /tmp/easel-bench).
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

T0=$(date +%s)
TOTAL="${BENCH_TOTAL_S:-540}"
DEADLINE=$((T0 + TOTAL))
SUMMARY_RESERVE=15 # seconds kept for the summary and packing at the end
# Estimates before any GPU run (compile at load dominates SD1.5/SDXL; Qwen-Image's 50-step calls take ~18 s each):
# revisit them with the first run's steps.txt. BENCH_BUDGET_<STEP>=seconds overrides one (QWEN_IMAGE for qwen-image).
declare -A BUDGET=(
    [sd15]="${BENCH_BUDGET_SD15:-105}"
    [sdxl]="${BENCH_BUDGET_SDXL:-100}"
    [flux]="${BENCH_BUDGET_FLUX:-100}"
    [qwen-image]="${BENCH_BUDGET_QWEN_IMAGE:-125}"
    [http]="${BENCH_BUDGET_HTTP:-95}"
    [capped]="${BENCH_BUDGET_CAPPED:-540}"
)

STAMP="$(date +%Y%m%d-%H%M%S)"
RES="${BENCH_RESULTS:-bench-results/$STAMP}"
if [ -n "${OUT:-}" ] && [ -z "${BENCH_RESULTS:-}" ]; then
    RES="${TMPDIR:-/tmp}/easel-bench-results/$STAMP"
fi
WORK="${BENCH_WORK:-${TMPDIR:-/tmp}/easel-bench${BENCH_TINY:+-tiny}}"
mkdir -p "$RES" "$WORK"
# One compile cache for every process: the http step's servers reuse the SD1.5 graphs the sd15 step compiled.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor}"

TINY=()
HTTP_SIZE=(--size 512 --steps 20 --n 12 --warmup 2 --k 16 --rounds 2)
if [ -n "${BENCH_TINY:-}" ]; then
    TINY=(--tiny)
    HTTP_SIZE=(--size 64 --steps 2 --n 3 --warmup 1 --k 4 --rounds 1)
elif ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench_gpu.sh: no CUDA device here (the harness alone: python scripts/bench_gpu.py --tiny)" >&2
    exit 2
fi
{ nvidia-smi || true; "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } \
    >"$RES/gpu.txt" 2>&1

# Seconds a step may take: its budget, or less when the overall deadline is nearer.
step_limit() {
    local left=$((DEADLINE - $(date +%s) - SUMMARY_RESERVE))
    local want="${BUDGET[$1]}"
    if [ "$left" -lt "$want" ]; then want="$left"; fi
    echo "$want"
}

steps=("$@")
if [ ${#steps[@]} -eq 0 ]; then
    steps=(sd15 sdxl flux qwen-image http)
fi
status=0
for step in "${steps[@]}"; do
    if [ -z "${BUDGET[$step]:-}" ]; then
        echo "bench_gpu.sh: unknown step '$step' (known: sd15 sdxl flux qwen-image http capped)" >&2
        exit 2
    fi
    limit=$(step_limit "$step")
    if [ "$limit" -lt 20 ]; then
        echo "== $step: skipped, ${limit} s left of the ${TOTAL} s budget" | tee -a "$RES/steps.txt"
        continue
    fi
    s0=$(date +%s)
    echo "== $step: up to ${limit} s"
    case "$step" in
    sd15 | sdxl | flux | qwen-image)
        # The script stops timing 12 s before the hard limit, leaving time to write its JSON and exit.
        # shellcheck disable=SC2086  # BENCH_GPU_ARGS is a list of options
        timeout -s INT -k 20 "$limit" "$PY" scripts/bench_gpu.py "${TINY[@]}" --models "$step" \
            --budget-s $((limit - 12)) --profile "$RES/profile" --fp8-quality \
            --json-out "$RES/bench_gpu_$step.json" ${BENCH_GPU_ARGS:-} 2>&1 | tee "$RES/bench_gpu_$step.txt"
        rc=${PIPESTATUS[0]}
        ;;
    http)
        # Overhead (goal <= 1.03) and batching (goal >= 2x, 16 concurrent) through the real server, full-size
        # SD1.5 512x512 20 steps. Its servers compile at load like production (from the sd15 step's cache).
        SAVE_ARGS="${TINY[*]}" HTTP_ARGS="${HTTP_SIZE[*]}" timeout -s INT -k 20 "$limit" bash -c '
            set -e
            if [ ! -f "$1/sd15-random/models.yaml" ]; then
                "$PY" scripts/bench_gpu.py $SAVE_ARGS --save-sd15 "$1/sd15-random"
            fi
            exec "$PY" scripts/bench.py --models "$1/sd15-random/models.yaml" --model bench-sd15 \
                --data-dir "$1/data" --json-out "$2/bench_http.json" $HTTP_ARGS
        ' _ "$WORK" "$RES" 2>&1 | tee "$RES/bench_http.txt"
        rc=${PIPESTATUS[0]}
        ;;
    capped)
        # Issue #22: each row in its own process, under torch.cuda.set_per_process_memory_fraction.
        CAPPED_ARGS=(--all --only "${BENCH_CAPPED_ONLY:-}" --budget-s $((limit - 15)) --json-out "$RES/bench_capped.json")
        if [ -n "${BENCH_TINY:-}" ]; then CAPPED_ARGS+=(--tiny); fi
        timeout -s INT -k 20 "$limit" "$PY" scripts/bench_capped.py "${CAPPED_ARGS[@]}" 2>&1 | tee "$RES/bench_capped.txt"
        rc=${PIPESTATUS[0]}
        ;;
    esac
    took=$(($(date +%s) - s0))
    note=""
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note=" (stopped at its limit: results are partial)"; fi
    if [ "$rc" -ne 0 ]; then status=1; fi
    echo "== $step: ${took} s, exit ${rc}${note}" | tee -a "$RES/steps.txt"
done

"$PY" scripts/bench_gpu.py --summarize "$RES" 2>&1 | tee "$RES/summary.txt"
tee -a "$RES/summary.txt" <"$RES/steps.txt"
echo "== whole run: $(($(date +%s) - T0)) s of ${TOTAL} s" | tee -a "$RES/summary.txt"
if [ -n "${OUT:-}" ] && [ "$RES" != "$OUT" ]; then
    mkdir -p "$OUT"
    tar -czf "$OUT/bench-results.tar.gz" -C "$(dirname "$RES")" "$(basename "$RES")"
    cp "$RES/summary.txt" "$RES/summary.json" "$OUT/" 2>/dev/null || true
fi
echo "results: $RES"
exit "$status"
