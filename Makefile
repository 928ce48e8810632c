# Two commands for users: `make serve` and `make test`. Each sets up .venv on first use.
# torch is installed first and pinned: a bare `torch` requirement pulls CUDA wheels on CPU hosts.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: serve bench test lint screenshots setup clean gpu-check gpu-wheels

# uv installs into the venv (the same packages as pip, in about 120 s where pip took about 200 s on 2
# cores); it reads no pip.conf, so pip's find-links (a local torch wheel, say) are handed to it.
FIND_LINKS ?= $(sort $(PIP_FIND_LINKS) $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
UV_INSTALL = $(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode $(addprefix --find-links ,$(FIND_LINKS))

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(UV_INSTALL) $(TORCH)
	$(UV_INSTALL) -e '.[test,openvino,cluster,dev]'
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(BIN)/livediff serve $(ARGS)

bench: setup
	$(BIN)/livediff bench $(ARGS)

# Two pytest-xdist workers (JOBS=1: one process): a module runs whole on one worker, the modules with
# slow tests first (tests/conftest.py). Many tests wait on real time (streams at camera rate, network
# cases, browsers): two workers overlap those waits on two cores.
JOBS ?= 2
test: setup
	$(BIN)/python -m pytest -q --durations=20 $(if $(filter-out 1,$(JOBS)),-n $(JOBS) --dist loadfile --no-loadscope-reorder) $(ARGS)

# What CI checks before the tests: lint, formatting (ruff, line length 120) and types (mypy, 0 errors).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy livediff

# The page screenshots of README.md and docs/pages-and-obs.md, as the browser tests take them (needs Chromium).
screenshots: setup
	$(BIN)/python -m pytest -q tests/test_pages.py
	cp test-artifacts/page-demo.png test-artifacts/page-latency.png test-artifacts/page-viewer.png web/screenshots/

# The GPU check (docs/gpu-check.md): a dry run on the CPU here; on a lent GPU, run through the device
# tool with .gpu-wheels carried. No `setup` dependency: the device machine cannot install a venv.
gpu-check:
	bash scripts/gpu-check $(ARGS)

gpu-wheels:
	bash scripts/gpu-wheels

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts gpu-check-out .gpu-wheels
