PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: install lint test demo
install:
	$(PYTHON) -m pip install -q -e '.[dev]'

# The team's style checks (rules in pyproject.toml).
lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# Installs the package with its test extras, then runs the whole suite on CPU.
test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q $(PYTEST_ARGS) tests

# The main job on the embedded default: local Ray on 127.0.0.1, local disk, CPU, tiny random
# encoders. Producers encode synthetic text renders into ./cache (exactly once; a rerun skips what
# is committed), the cache is verified, then a consumer trains the tiny MMDiT on it for 30 steps
# (checkpoints and logs in ./runs/demo, a diffusers export in ./runs/demo/diffusers).
demo: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m megatron_qwenimage.cli produce --input 'synthetic:text?n=48&seed=0' --output ./cache --buckets 256 --encoders tiny --metrics-port 0 --partition-size 16
	HF_HUB_OFFLINE=1 $(PYTHON) -m megatron_qwenimage.cli cache verify ./cache
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PYTHON) -m megatron_qwenimage.cli train --config examples/demo.yaml
