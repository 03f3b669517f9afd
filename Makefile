PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: install test demo
install:
	$(PYTHON) -m pip install -q -e '.[dev]'

# Installs the package with its test extras, then runs the whole suite on CPU.
test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q $(PYTEST_ARGS) tests

# Producer demo: embedded local Ray on 127.0.0.1, CPU, tiny encoders, synthetic text renders -> ./cache
demo: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m megatron_qwenimage.cli produce --input 'synthetic:text?n=48&seed=0' --output ./cache --buckets 256,640 --encoders tiny --metrics-port 0 --partition-size 16
	HF_HUB_OFFLINE=1 $(PYTHON) -m megatron_qwenimage.cli cache verify ./cache
