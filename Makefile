# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv, install everything, run the main job on a built-in default:
#                 a random HF Llama from a shipped config -> megatron at TP=2 -> parity -> HF again
#   make test   - create .venv, install everything, run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PACKAGES := -e . -e plugins/gpt -e plugins/mamba -e plugins/hf_bridge -e examples/plugtron-example-plugin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml plugins/*/pyproject.toml examples/plugtron-example-plugin/pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch pulls several GB of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt $(PACKAGES) "transformers==5.23.0" pytest hypothesis
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/plugtron plugins
	$(BIN)/plugtron hf-demo --workdir out/hf-demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV)
