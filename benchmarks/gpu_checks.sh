#!/usr/bin/env bash
# GPU checks for one H100/H200 (run in the repo root on the GPU machine).
#
# Expects, as the device tool's notes describe: wheels of megatron-core and diffusers for the
# machine's Python under .whl/, and Transformer Engine staged by ../shared/device/prepare_te.sh
# under .dev-te/ (its core wheel's parts already copied to /tmp/stash). Runs
#   1. the TE-backend tests (TE vs local backend, FP8 recipes) and the diffusers parity tests;
#   2. benchmarks/mmdit_step.py on a 4-block slice of the 20B model at 1024x1024 (batch 2,
#      256 text tokens) for the local backend (skipped with GPU_CHECKS=tests), TE bf16 and TE FP8, each against diffusers' eager
#      model measured in the same process (the anchor), unpadded and with a text padding mask;
#      results as JSON lines in $OUT/mmdit.jsonl. GPU_CHECKS=tests: only 1; GPU_CHECKS=padded: 1 and
#      only the padded-text benchmarks.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
source .dev-te/deps/install_te.sh || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_te_backend.py tests/test_mmdit_parity.py 2>&1 \
  | grep -v -E "warnings.warn|Warning:" | tail -60
[ "${GPU_CHECKS:-all}" = tests ] && exit 0
run_step() {  # one benchmark configuration, a JSON line into $OUT/mmdit.jsonl and a summary line
  echo "== mmdit_step $*"
  python3 benchmarks/mmdit_step.py --device cuda --dtype bf16 --config qwen-image-20b --layers 4 \
    --height 1024 --width 1024 --text-tokens 256 --batch 2 --iters 10 --warmup 3 "$@" --json \
    | tee -a "$OUT/mmdit.jsonl" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print({k: r[k] for k in ("backend","fp8","padded_text_tokens","ratio","max_abs_diff_forward")}, {n: round(r[n]["model_tflops_per_s"],1) for n in ("ours","diffusers")})'
}
if [ "${GPU_CHECKS:-all}" != padded ]; then
  run_step --backend local
  run_step --backend transformer_engine
  run_step --backend transformer_engine --fp8 delayed
fi
# Captions of different lengths: a text padding mask (half the samples, 64 of 256 tokens padded).
run_step --backend local --padded-text-tokens 64
run_step --backend transformer_engine --padded-text-tokens 64
