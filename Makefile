PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: install lint test demo
install:
	$(PYTHON) -m pip install -q -e '.[dev]'

# The team's style checks (rules in pyproject.toml): ruff, and the import contracts (library at
# the bottom, applications over it, launchers on top, no import circle).
lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	lint-imports

# Installs the package with its test extras, then runs the whole suite on CPU.
test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q $(PYTEST_ARGS) tests

# The main job on the embedded default (the README's first command): `qwenimage run
# examples/local.yaml`: producers on local Ray (127.0.0.1, tiny random encoders, CPU) encode the
# bundled input into ./cache/local while a torchrun consumer (TP=2 + SP, 2 CPU processes) trains
# from the growing cache; outputs under ./runs/local. Rerunning resumes.
demo: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m megatron_qwenimage.cli run examples/local.yaml
