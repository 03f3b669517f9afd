PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: install test demo
install:
	$(PYTHON) -m pip install -q -e '.[dev]'

# Installs the package with its test extras, then runs the whole suite on CPU.
test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q $(PYTEST_ARGS) tests
