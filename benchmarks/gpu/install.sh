#!/usr/bin/env bash
# Source on the GPU machine, in the repository root, after benchmarks/gpu/stage.sh's staging:
#
#   INSTALL_TE=1 INSTALL_PROD=0 source benchmarks/gpu/install.sh && python3 benchmarks/gpu/run.py ...
#
# * always: the .whl/ wheels into /tmp/site;
# * INSTALL_TE=1 (default): Transformer Engine into /tmp/te, from the core wheel's parts copied to
#   /tmp/stash (the last part may still sit in .dev-te/pN) and .dev-te/deps; builds TE's torch
#   extension from source when no prebuilt copy imports;
# * INSTALL_PROD=1 (default 0): the producers' wheels into /tmp/site, from the .dev-prod bundle's
#   parts copied to /tmp/stash-prod (parts this call carries in .dev-prod/pK are copied there too),
#   reassembled and checked against the bundle's sha256.
#
# Exports PYTHONPATH. Idempotent: what a marker says is installed is not installed again. A failure
# prints one line `install.sh: ...` naming what is missing and returns (or exits) 1.
# benchmarks/gpu/device.sh sets INSTALL_TE / INSTALL_PROD from the stages it runs.
INSTALL_TE=${INSTALL_TE:-1}
INSTALL_PROD=${INSTALL_PROD:-0}

_qi_fail() { echo "install.sh: $*" >&2; return 1; }

_qi_pip() {  # _qi_pip TARGET WHEEL...: quiet; pip's own output only on failure
  local target=$1 log=/tmp/install-pip.log
  shift
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$target" "$@" >"$log" 2>&1 \
    || { tail -5 "$log" >&2; return 1; }
}

_qi_whl() {
  [ -f /tmp/site/.installed ] && return 0
  ls .whl/*.whl >/dev/null 2>&1 || _qi_fail ".whl/ has no wheels: run benchmarks/gpu/stage.sh and carry .whl" || return 1
  _qi_pip /tmp/site .whl/*.whl || _qi_fail "pip install of .whl/ into /tmp/site failed" || return 1
  touch /tmp/site/.installed
}

_qi_te() {
  local D=.dev-te/deps whl p
  PYTHONPATH=/tmp/te python3 -c 'import transformer_engine.pytorch' 2>/dev/null && return 0
  [ -f $D/core.name ] || _qi_fail "TE: .dev-te/deps missing (carry it in this call)" || return 1
  mkdir -p /tmp/stash && for p in .dev-te/p*; do cp "$p"/part* /tmp/stash/ 2>/dev/null; done
  whl=/tmp/$(cat $D/core.name)
  cat /tmp/stash/part* > "$whl" 2>/dev/null
  [ "$(sha256sum "$whl" | cut -c1-64)" = "$(cat $D/core.sha256)" ] \
    || _qi_fail "TE core wheel incomplete: /tmp/stash has $(ls /tmp/stash | tr '\n' ' ')- copy every .dev-te/pK/part* there first" \
    || return 1
  _qi_pip /tmp/te "$whl" $D/*.whl || _qi_fail "pip install of TE into /tmp/te failed" || return 1
  cp $D/transformer_engine_torch*.so /tmp/te/transformer_engine/wheel_lib/ 2>/dev/null
  PYTHONPATH=/tmp/te python3 -c 'import transformer_engine.pytorch' 2>/dev/null && return 0
  echo "install.sh: building TE's torch extension from source (about 2 minutes on 16 cores)"
  rm -f /tmp/te/transformer_engine/wheel_lib/transformer_engine_torch*.so
  mkdir -p /tmp/tebuild && tar xzf $D/transformer_engine_torch-*.tar.gz -C /tmp/tebuild
  (cd /tmp/tebuild/transformer_engine_torch-* && PYTHONPATH=/tmp/te NVTE_PYTORCH_FORCE_BUILD=TRUE MAX_JOBS=16 \
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/tebuild/out .) \
    || _qi_fail "building TE's torch extension failed" || return 1
  cp /tmp/tebuild/transformer_engine_torch-*/build/lib.*/transformer_engine/wheel_lib/transformer_engine_torch*.so \
    /tmp/te/transformer_engine/wheel_lib/
}

# The producer bundle: parts partNN in PROD_STASH (default /tmp/stash-prod), with bundle.name,
# bundle.parts and bundle.sha256 beside them.
_qi_prod() {
  local S=${PROD_STASH:-/tmp/stash-prod} p sha n i f missing="" bundle
  mkdir -p "$S"
  for p in .dev-prod/p*; do [ -d "$p" ] && cp "$p"/* "$S"/; done
  [ -f "$S/bundle.sha256" ] \
    || _qi_fail "producer wheels missing: no .dev-prod/pK part reached $S (copy each .dev-prod/pK/* there, one call each)" \
    || return 1
  sha=$(cat "$S/bundle.sha256")
  [ "$(cat /tmp/site/.installed-prod 2>/dev/null)" = "$sha" ] && return 0
  n=$(cat "$S/bundle.parts")
  for i in $(seq 0 $((n - 1))); do
    f=$(printf 'part%02d' "$i")
    [ -f "$S/$f" ] || missing="$missing .dev-prod/p$((i + 1))"
  done
  [ -z "$missing" ] || _qi_fail "producer wheels incomplete: $S lacks the part of$missing (of $n; copy them there first)" \
    || return 1
  bundle=/tmp/$(cat "$S/bundle.name")
  cat "$S"/part[0-9][0-9] > "$bundle"
  [ "$(sha256sum "$bundle" | cut -c1-64)" = "$sha" ] \
    || _qi_fail "producer wheels corrupt: $bundle does not match bundle.sha256 (parts from two stagings? copy all of one again)" \
    || return 1
  rm -rf /tmp/prod-wheels && mkdir -p /tmp/prod-wheels && tar xf "$bundle" -C /tmp/prod-wheels \
    || _qi_fail "producer wheels: cannot unpack $bundle" || return 1
  _qi_pip /tmp/site /tmp/prod-wheels/wheels/*.whl || _qi_fail "pip install of the producer wheels into /tmp/site failed" \
    || return 1
  echo "$sha" > /tmp/site/.installed-prod
  rm -f "$bundle"
}

_qi_check() {
  local mods="torch, diffusers"
  [ "$INSTALL_TE" = 1 ] && mods="$mods, transformer_engine.pytorch, megatron.core"
  [ "$INSTALL_PROD" = 1 ] && mods="$mods, ray, ray.data, pyarrow, pandas, transformers, tokenizers, zarr, PIL, psutil"
  python3 -c "import $mods, torch; print('ready:', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', '| $mods')" \
    || _qi_fail "imports failed after install ($mods)"
}

_qi_main() {
  _qi_whl || return 1
  if [ "$INSTALL_TE" = 1 ]; then _qi_te || return 1; fi
  if [ "$INSTALL_PROD" = 1 ]; then _qi_prod || return 1; fi
  export PYTHONPATH=/tmp/te:/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  _qi_check
}

_qi_main
_qi_rc=$?
return $_qi_rc 2>/dev/null || exit $_qi_rc
