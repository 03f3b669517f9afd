#!/usr/bin/env bash
# Run on a CPU machine with PyPI access, in the repository root:
#
#   bash benchmarks/gpu/stage.sh [te] [prod]      # default: both
#
# Stages what a bare GPU machine (Python 3.12, torch 2.11 + CUDA 13, no registry access) lacks for
# benchmarks/gpu/ and benchmarks/produce.py, into git-ignored folders:
#
#   .whl/             megatron-core, diffusers, torchao, zarr (+ numcodecs, donfig, google-crc32c),
#                     always: installed there into /tmp/site by benchmarks/gpu/install.sh
#   .dev-te/p1..pN    (te) Transformer Engine's core wheel (276 MB) cut into 50 MB parts, for
#                     machines whose calls carry a limited payload: copy each part to /tmp/stash there
#   .dev-te/deps      (te) TE's Python wheels and dependencies, the torch-extension source, the part
#                     checksum; TE_TORCH_EXTENSION=path/to/transformer_engine_torch*.so adds a
#                     prebuilt torch extension (built against the GPU machine's torch), else
#                     install.sh builds it from source there (about 2 minutes on 16 cores).
#   .dev-prod/p1..pN  (prod) what the producers need besides torch and .whl (Ray, pyarrow, pandas,
#                     transformers, tokenizers, huggingface_hub, Pillow, ... and their dependencies;
#                     Ray alone is 76 MB): one uncompressed tar of the wheels (177 MiB) cut into as
#                     few equal parts as PROD_PART_MIB (60) allows: 3 parts of 59 MiB, each of which
#                     travels with the 2.4 MiB work tree in one call of at most 64 MiB. Each pK holds
#                     its part and the bundle's name, number of parts and sha256, so a call only
#                     copies pK/* to /tmp/stash-prod there.
#
# Versions are pinned to the CI environment's (`pip show` on the CPU machines, 2026-11-30), so the
# GPU machine runs the same code as the CPU tests; torch's own dependencies (numpy, sympy,
# networkx, jinja2) are the GPU machine's. TE_VERSION (2.20.2), PY_VERSION (3.12).
set -euo pipefail
TE_VERSION=${TE_VERSION:-2.20.2}
PY_VERSION=${PY_VERSION:-3.12}
PROD_PART_MIB=${PROD_PART_MIB:-60}
WHAT=${*:-te prod}
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
P="--no-deps --only-binary=:all: --python-version $PY_VERSION --implementation cp $PLAT"
# The producers' run-time imports (benchmarks/produce.py, producers/, megatron_qwenimage/cache/, Ray
# Data's workers; traced with an import audit hook in every process of a run) and the closure of
# their requirements, less hf-xet (huggingface_hub's download backend, never imported offline), and
# dashscope without its requirements (only its file qwen.tiktoken: the Qwen BPE the tiny and --full
# random encoders' tokenizer is built from). Ray without [default]: no dashboard, as the producers
# start it.
PROD_WHEELS="ray==2.60.0 pyarrow==26.0.1 pandas==3.1.1 python-dateutil==2.9.0.post0 six==1.17.0
  transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 huggingface-hub==2.4.0
  httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 anyio==4.16.0 idna==3.20 certifi==2026.5.20 truststore==0.10.5
  regex==2026.5.9 tqdm==4.70.1 typer==0.29.2 click==8.5.1 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2
  pygments==2.20.0 shellingham==1.5.4 annotated-doc==0.0.7 pydantic==2.13.4 pydantic-core==2.46.4
  annotated-types==0.7.0 typing-inspection==0.4.2 pyyaml==6.0.3 packaging==26.4 requests==2.34.2
  urllib3==2.7.0 charset-normalizer==3.4.7 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
  referencing==0.37.0 rpds-py==0.30.0 attrs==26.1.0 msgpack==1.2.4 protobuf==7.36.2 pillow==13.0.0
  importlib-metadata==10.2.0 zipp==4.1.2 lazy-importer==0.1.0 psutil==7.2.2 prometheus-client==0.26.0
  tiktoken==0.14.0 tifffile==2026.3.3 typing-extensions==4.16.0 fsspec==2026.9.0 filelock==4.3.1
  dashscope==2.0.2"

stage_whl() {
  rm -rf .whl && mkdir -p .whl
  python3 -m pip download -q $P -d .whl megatron-core==0.16.1 diffusers==0.42.1 torchao==0.17.0 zarr==3.1.6 \
    numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
}

stage_te() {
  mkdir -p .dev-te/deps .dev-te/dl
  python3 -m pip download -q $P -d .dev-te/dl "transformer-engine-cu13==$TE_VERSION"
  python3 -m pip download -q $P -d .dev-te/deps "transformer-engine==$TE_VERSION" nvidia-cudnn-frontend pydantic \
    pydantic-core annotated-types typing-inspection importlib-metadata nvdlfw-inspect
  # pip downloads an sdist only after building its metadata, which TE's setup.py cannot do on a
  # machine without CUDA and a torch its build isolation accepts: keep a copy staged before.
  local sdist=.dev-te/deps/transformer_engine_torch-$TE_VERSION.tar.gz
  [ -f "$sdist" ] || python3 -m pip download -q --no-deps --no-binary=:all: -d .dev-te/deps \
    "transformer-engine-torch==$TE_VERSION" || { echo "stage.sh: cannot fetch $sdist (pip builds its metadata" \
    "first); put TE's torch-extension sdist there by hand, or pass TE_TORCH_EXTENSION" >&2; exit 1; }
  local core
  core=$(ls .dev-te/dl/transformer_engine_cu13-"$TE_VERSION"-*.whl)
  sha256sum "$core" | cut -c1-64 > .dev-te/deps/core.sha256
  basename "$core" > .dev-te/deps/core.name
  rm -rf .dev-te/p[0-9]* .dev-te/split && mkdir -p .dev-te/split
  split -b 50M -d -a 1 "$core" .dev-te/split/part
  local i=1 f
  for f in .dev-te/split/part*; do mkdir -p ".dev-te/p$i"; mv "$f" ".dev-te/p$i/"; i=$((i + 1)); done
  rm -rf .dev-te/split .dev-te/dl
  if [ -n "${TE_TORCH_EXTENSION:-}" ]; then cp "$TE_TORCH_EXTENSION" .dev-te/deps/; fi
  echo "staged TE: copy .dev-te/p1 .. p$((i - 1)) to /tmp/stash on the GPU machine"
}

stage_prod() {
  rm -rf .dev-prod && mkdir -p .dev-prod/dl/wheels
  # shellcheck disable=SC2086
  python3 -m pip download -q $P -d .dev-prod/dl/wheels $PROD_WHEELS
  local bundle=.dev-prod/dl/producer-wheels.tar n i f
  # a reproducible tar: the same wheels give the same checksum
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$bundle" -C .dev-prod/dl wheels
  # as few parts as PROD_PART_MIB allows, of equal size (nothing left over for a call of its own)
  local size max
  size=$(stat -c %s "$bundle")
  max=$((PROD_PART_MIB * 1048576))
  n=$(((size + max - 1) / max))
  split -n "$n" -d -a 2 "$bundle" .dev-prod/dl/part
  i=1
  for f in .dev-prod/dl/part*; do
    mkdir -p ".dev-prod/p$i"
    mv "$f" ".dev-prod/p$i/"
    sha256sum "$bundle" | cut -c1-64 > ".dev-prod/p$i/bundle.sha256"
    basename "$bundle" > ".dev-prod/p$i/bundle.name"
    echo "$n" > ".dev-prod/p$i/bundle.parts"
    i=$((i + 1))
  done
  ls .dev-prod/dl/wheels > .dev-prod/wheels.txt
  rm -rf .dev-prod/dl
  echo "staged producers: copy .dev-prod/p1 .. p$n to /tmp/stash-prod on the GPU machine, one call each"
}

stage_whl
for w in $WHAT; do
  case "$w" in
    te) stage_te ;;
    prod) stage_prod ;;
    *) echo "stage.sh: unknown part $w (expected te, prod)" >&2; exit 2 ;;
  esac
done
du -sh .whl .dev-te/p* .dev-te/deps .dev-prod/p* 2>/dev/null || true
echo "then run benchmarks/gpu/install.sh there (device.sh sources it)"
