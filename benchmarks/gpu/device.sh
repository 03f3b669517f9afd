#!/usr/bin/env bash
# The GPU checks, run in the repository root of the GPU machine after benchmarks/gpu/stage.sh's
# staging (see benchmarks/gpu/README.md). Stages, in the order given (default: tests bench):
#   tests    the GPU tests: the TE backend (TE vs local incl. padded and left-padded text, FP8
#            engaged), CUDA graphs in the training engine (bf16, FP8), FP8 attention
#   bench    benchmarks/gpu/run.py: anchors and ours, one JSON line per figure -> $OUT/gpu.jsonl
#   loop     benchmarks/gpu/train_loop.py: qwenimage train, FP8 vs bf16, with and without CUDA graphs
#            -> $OUT/train_loop.jsonl (LOOP_ARGS adds flags, e.g. '--steps 30 --runs fp8:nofused,fp8:graphs')
#   produce  benchmarks/produce.py --full --side 1024: the producer pipeline vs the bare encoder
#            loop, the producer-code VAE (default, channels_last, compile, both) vs the bare
#            diffusers bf16 encode, Qwen2.5-VL prompts/s -> $OUT/produce.json (the latest JSON line,
#            rewritten after each part) and $OUT/produce.stderr
# BENCH_BUDGET_S bounds run.py (default 330 s); BENCH_ARGS adds flags to it; PRODUCE_ARGS adds flags
# to produce.py (e.g. '--parts vae --vae-variants compile'), PRODUCE_SIDE (1024) sets its side.
# Every stage has a hard timeout (TESTS_TIMEOUT_S, BENCH_TIMEOUT_S, LOOP_TIMEOUT_S,
# PRODUCE_TIMEOUT_S) so that a call with a time limit always returns what the stages before wrote.
# tests/bench/loop need Transformer Engine (.dev-te), produce the producer wheels (.dev-prod):
# install.sh installs only what the stages given need.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
STAGES="${*:-tests bench}"
INSTALL_TE=0 INSTALL_PROD=0
for s in $STAGES; do
  case "$s" in
    tests | bench | loop) INSTALL_TE=1 ;;
    produce) INSTALL_PROD=1 ;;
    *) echo "device.sh: unknown stage $s (expected tests, bench, loop, produce)"; exit 2 ;;
  esac
done
export INSTALL_TE INSTALL_PROD
source benchmarks/gpu/install.sh || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
for stage in $STAGES; do
  for s in $stage; do
    case "$s" in
      tests)
        timeout "${TESTS_TIMEOUT_S:-150}" python3 -m pytest -q -p no:cacheprovider -rfEs --tb=short tests/model/test_te_backend.py \
          tests/consumers/test_cuda_graphs_loop.py tests/consumers/test_precision.py -k "te_ or gpu" 2>&1 \
          | grep -v -E "warnings.warn|Warning:" | tee "$OUT/te_tests.log" | tail -25 ;;
      bench)
        timeout "${BENCH_TIMEOUT_S:-$(( ${BENCH_BUDGET_S:-330} + 60 ))}" \
          python3 benchmarks/gpu/run.py --out "$OUT/gpu.jsonl" --budget-s "${BENCH_BUDGET_S:-330}" ${BENCH_ARGS:-} \
          2>"$OUT/bench.stderr" | grep -E '"what": "(step|summary|optimizer|parity|peak|environment|profile)"' | cut -c1-400 ;;
      loop)
        timeout "${LOOP_TIMEOUT_S:-240}" python3 benchmarks/gpu/train_loop.py --work /tmp/loop \
          --out "$OUT/train_loop.jsonl" --timeout-s "${LOOP_RUN_TIMEOUT_S:-65}" ${LOOP_ARGS:-} 2>"$OUT/loop.stderr" \
          | cut -c1-600 ;;
      produce)
        RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} timeout "${PRODUCE_TIMEOUT_S:-540}" \
          python3 benchmarks/produce.py --full --side "${PRODUCE_SIDE:-1024}" --workdir /tmp/produce \
          --out "$OUT/produce.json" ${PRODUCE_ARGS:-} 2>"$OUT/produce.stderr" | cut -c1-4000
        echo "produce: exit ${PIPESTATUS[0]} (124: PRODUCE_TIMEOUT_S; $OUT/produce.json holds the parts done)" ;;
    esac
  done
done
