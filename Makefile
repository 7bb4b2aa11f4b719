# Levante: `make run` serves the default model, `make test` runs the suite (both set up first).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODEL ?= smollm2
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup bytecode run test test-slow test-all browser fuzz lint typecheck clean

setup: $(VENV)/.installed bytecode

# Levante's own modules compiled to bytecode: pip compiles what it installs, but not an
# editable install, and where PYTHONDONTWRITEBYTECODE is set (as on CI) Python never caches
# them, so every command compiled ~120 modules first (+0.1 s of a ~2 s cold `levante
# generate` on 2 cores). Up-to-date files are skipped; a stale one is recompiled here.
bytecode: $(VENV)/.installed
	@$(PY) -m compileall -q src

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	@# compile the CPU kernels now rather than on the first run (cached per CPU and torch)
	$(PY) -c 'from levante.quant import kernels; print("kernels:", kernels.kernel_isa() or "not built: PyTorch fallback")'
	touch $@

run: setup
	$(VENV)/bin/levante pull $(MODEL)
	$(VENV)/bin/levante serve $(MODEL) --host $(HOST) --port $(PORT)

# The fast tier (1:29 wall on 2 idle cores, 2026-12-04); test-slow runs the rest (tests/slow_tests.txt
# and @pytest.mark.slow); CI runs both (.ci/run).
test: setup browser
	$(VENV)/bin/levante pull $(MODEL)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: setup browser
	$(VENV)/bin/levante pull $(MODEL)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

test-all: test test-slow

# Debian's Chromium for the chat-page test (skipped with a reason where it can't be had).
browser:
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
	    && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq chromium >/dev/null \
	    || echo "chromium not installed: the browser test will be skipped"; fi

# A longer fuzz run than the suite's: the API (schemathesis) and GGUF metadata (hypothesis).
fuzz: setup
	$(PY) benchmarks/fuzz_api.py --examples 500 --seconds-per-operation 120
	LEVANTE_FUZZ_EXAMPLES=5000 LEVANTE_FUZZ_RANDOM=1 $(PY) -m pytest -q -p no:cacheprovider tests/weights/test_gguf_fuzz.py

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

# pyproject.toml's [tool.mypy]; the suite runs the same check (tests/test_types.py).
typecheck: setup
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info
