#!/usr/bin/env bash
# The GPU checks, run in the repository root of the GPU machine after benchmarks/gpu/stage.sh's
# staging (see benchmarks/gpu/README.md). Stages, in the order given (default: tests bench):
#   tests  the TE-backend tests (TE vs local incl. padded and left-padded text, FP8 engaged)
#   bench  benchmarks/gpu/run.py: anchors and ours, one JSON line per figure -> $OUT/gpu.jsonl
#   loop   benchmarks/gpu/train_loop.py: qwenimage train, FP8 vs bf16 -> $OUT/train_loop.jsonl
# BENCH_BUDGET_S bounds run.py (default 330 s); BENCH_ARGS adds flags to it. Every stage has a
# hard timeout (TESTS_TIMEOUT_S, BENCH_TIMEOUT_S, LOOP_TIMEOUT_S) so that a call with a time limit
# always returns what the stages before wrote.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
source benchmarks/gpu/install.sh || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
for stage in "${@:-tests bench}"; do
  for s in $stage; do
    case "$s" in
      tests)
        timeout "${TESTS_TIMEOUT_S:-90}" python3 -m pytest -q -p no:cacheprovider -rfEs --tb=short tests/model/test_te_backend.py 2>&1 \
          | grep -v -E "warnings.warn|Warning:" | tee "$OUT/te_tests.log" | tail -25 ;;
      bench)
        timeout "${BENCH_TIMEOUT_S:-$(( ${BENCH_BUDGET_S:-330} + 60 ))}" \
          python3 benchmarks/gpu/run.py --out "$OUT/gpu.jsonl" --budget-s "${BENCH_BUDGET_S:-330}" ${BENCH_ARGS:-} \
          2>"$OUT/bench.stderr" | grep -E '"what": "(step|summary|optimizer|parity|peak|environment|profile)"' | cut -c1-400 ;;
      loop)
        timeout "${LOOP_TIMEOUT_S:-150}" python3 benchmarks/gpu/train_loop.py --work /tmp/loop \
          --out "$OUT/train_loop.jsonl" --timeout-s "${LOOP_RUN_TIMEOUT_S:-65}" 2>"$OUT/loop.stderr" \
          | cut -c1-600 ;;
      *) echo "device.sh: unknown stage $s (expected tests, bench, loop)"; exit 2 ;;
    esac
  done
done
