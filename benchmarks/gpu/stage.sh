#!/usr/bin/env bash
# Run on a CPU machine with PyPI access, in the repository root. Stages what a bare GPU machine
# (Python 3.12, torch 2.11 + CUDA 13, no registry access) lacks for benchmarks/gpu/:
#
#   .whl/            megatron-core, diffusers, torchao, zarr (+ numcodecs, donfig, google-crc32c):
#                    installed there into /tmp/site by benchmarks/gpu/install.sh
#   .dev-te/p1..pN   Transformer Engine's core wheel (276 MB) cut into 50 MB parts, for machines
#                    whose calls carry a limited payload: copy each part to /tmp/stash there
#   .dev-te/deps     TE's Python wheels and dependencies, the torch-extension source, the part
#                    checksum; TE_TORCH_EXTENSION=path/to/transformer_engine_torch*.so adds a
#                    prebuilt torch extension (built against the GPU machine's torch), else
#                    install.sh builds it from source there (about 2 minutes on 16 cores).
#
# Both folders are git-ignored. Versions: TE_VERSION (2.20.2), PY_VERSION (3.12).
set -euo pipefail
TE_VERSION=${TE_VERSION:-2.20.2}
PY_VERSION=${PY_VERSION:-3.12}
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
P="--no-deps --only-binary=:all: --python-version $PY_VERSION --implementation cp $PLAT"
mkdir -p .whl .dev-te/deps .dev-te/dl
python3 -m pip download -q $P -d .whl megatron-core==0.16.1 diffusers==0.42.1 torchao==0.17.0 zarr==3.1.5 \
  numcodecs==0.17.1 donfig google-crc32c
python3 -m pip download -q $P -d .dev-te/dl "transformer-engine-cu13==$TE_VERSION"
python3 -m pip download -q $P -d .dev-te/deps "transformer-engine==$TE_VERSION" nvidia-cudnn-frontend pydantic \
  pydantic-core annotated-types typing-inspection importlib-metadata nvdlfw-inspect
python3 -m pip download -q --no-deps --no-binary=:all: -d .dev-te/deps "transformer-engine-torch==$TE_VERSION"
core=$(ls .dev-te/dl/transformer_engine_cu13-"$TE_VERSION"-*.whl)
sha256sum "$core" | cut -c1-64 > .dev-te/deps/core.sha256
basename "$core" > .dev-te/deps/core.name
rm -rf .dev-te/p[0-9]* .dev-te/split && mkdir -p .dev-te/split
split -b 50M -d -a 1 "$core" .dev-te/split/part
i=1; for f in .dev-te/split/part*; do mkdir -p ".dev-te/p$i"; mv "$f" ".dev-te/p$i/"; i=$((i + 1)); done
rm -rf .dev-te/split .dev-te/dl
if [ -n "${TE_TORCH_EXTENSION:-}" ]; then cp "$TE_TORCH_EXTENSION" .dev-te/deps/; fi
du -sh .whl .dev-te/p* .dev-te/deps
echo "staged: copy .dev-te/p1 .. p$((i - 1)) to /tmp/stash on the GPU machine, then run benchmarks/gpu/install.sh there"
