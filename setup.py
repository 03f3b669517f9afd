"""Packaging for megatron-qwenimage.

CPU machines (development, CI) install the pinned CPU build of torch that lies on local disk:

    pip install -e '.[dev]'

A GPU cluster installs its CUDA build of torch first (for example
``pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130``), then
``pip install -e '.[gpu]'``; pip keeps the already-installed torch because it satisfies the pin.
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch==2.13.0",
    "megatron-core==0.16.1",
    "diffusers==0.42.1",
    "transformers>=5.0,<6",
    "ray[data,default]==2.60.0",
    "pyarrow>=18",
    "zarr>=3.1,<4",
    "safetensors>=0.4",
    "pyyaml>=6",
    "fsspec>=2024.1",
    "pillow>=10",
    "numpy>=1.26",
    "prometheus_client>=0.20",
    # The tests list the sockets of the producer's process tree (Ray vendors its own copy).
    "psutil>=5.9",
    "rich>=13",
    "tiktoken>=0.7",
    # Producers: TIFFs PIL cannot decode (float / planar samples) are read with tifffile.
    "tifffile>=2023.1",
    # `qwenimage report` draws its PNG with matplotlib; `qwenimage run`'s bundled input uses the
    # sample photos that ship inside scikit-image.
    "matplotlib>=3.6",
    "scikit-image>=0.24",
]

EXTRAS_REQUIRE = {
    # Transformer Engine brings FP8 GEMMs and fused attention on Hopper/Blackwell GPUs.
    # apex is optional too (megatron-core falls back to torch kernels); it is not on PyPI,
    # so a cluster builds it from source when it wants it.
    # nvidia-ml-py (the `pynvml` module) lets the producers report their encoders' GPU utilisation
    # (`producers.metrics.GpuProbe`; without it they report the pools' busy fraction).
    "gpu": ["transformer-engine[pytorch]>=2.8", "nvidia-ml-py>=12"],
    "dev": [
        "pytest>=8",
        "pytest-timeout>=2.3",
        # Real data for tests: the real Qwen BPE vocabulary (qwen.tiktoken) ships inside dashscope
        # (scikit-image's sample photos come with the install requirements).
        "dashscope>=1.20",
        "webdataset>=0.2",
        # Style checks (`make lint`, run by .ci/run before the tests; rules in pyproject.toml):
        # ruff, and import-linter's contracts on the import graph (layers, no circles).
        "ruff>=0.6",
        "import-linter>=2.1",
        # tests/test_installed_wheel.py builds a wheel without build isolation (bdist_wheel is
        # built into setuptools from 70.1).
        "setuptools>=70.1",
    ],
}

setup(
    name="megatron-qwenimage",
    version="0.1.0",
    description="Producer/consumer pretraining system for the Qwen-Image 20B MMDiT on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_qwenimage*", "producers*", "consumers*", "launch*"]),
    package_data={"megatron_qwenimage": ["configs/*.yaml", "gpu_results/*.jsonl"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["qwenimage=megatron_qwenimage.cli:main"]},
)
