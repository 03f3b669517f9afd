#!/usr/bin/env bash
# Source on the GPU machine, in the repository root, after benchmarks/gpu/stage.sh staged .whl/
# and .dev-te/ and the core wheel's parts were copied to /tmp/stash (the last part may still sit
# in .dev-te/pN). Installs the staged wheels into /tmp/site and Transformer Engine into /tmp/te,
# builds TE's torch extension from source when no prebuilt copy imports, and exports PYTHONPATH.
# Idempotent: a second call on the same machine only exports.
#   source benchmarks/gpu/install.sh && python3 benchmarks/gpu/run.py ...
D=.dev-te/deps
_fail() { echo "install.sh: $*" >&2; return 1 2>/dev/null || exit 1; }
if [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || _fail "pip install of .whl/ failed"
  touch /tmp/site/.installed
fi
if ! PYTHONPATH=/tmp/te python3 -c 'import transformer_engine.pytorch' 2>/dev/null; then
  mkdir -p /tmp/stash && for p in .dev-te/p*; do cp "$p"/part* /tmp/stash/ 2>/dev/null; done
  whl=/tmp/$(cat $D/core.name)
  cat /tmp/stash/part* > "$whl"
  [ "$(sha256sum "$whl" | cut -c1-64)" = "$(cat $D/core.sha256)" ] || _fail "TE core wheel incomplete: copy every part to /tmp/stash first"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/te "$whl" $D/*.whl || _fail "pip install of TE failed"
  cp $D/transformer_engine_torch*.so /tmp/te/transformer_engine/wheel_lib/ 2>/dev/null
  if ! PYTHONPATH=/tmp/te python3 -c 'import transformer_engine.pytorch' 2>/dev/null; then
    echo "install.sh: building TE's torch extension from source (about 2 minutes on 16 cores)"
    rm -f /tmp/te/transformer_engine/wheel_lib/transformer_engine_torch*.so
    mkdir -p /tmp/tebuild && tar xzf $D/transformer_engine_torch-*.tar.gz -C /tmp/tebuild
    (cd /tmp/tebuild/transformer_engine_torch-* && PYTHONPATH=/tmp/te NVTE_PYTORCH_FORCE_BUILD=TRUE MAX_JOBS=16 \
      python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/tebuild/out .) \
      || _fail "building TE's torch extension failed"
    cp /tmp/tebuild/transformer_engine_torch-*/build/lib.*/transformer_engine/wheel_lib/transformer_engine_torch*.so \
      /tmp/te/transformer_engine/wheel_lib/
  fi
fi
export PYTHONPATH=/tmp/te:/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c 'import transformer_engine.pytorch, torch, diffusers, megatron.core; print("ready:", torch.__version__, torch.cuda.get_device_name(), "TE", transformer_engine.__version__)' \
  || _fail "imports failed after install"
