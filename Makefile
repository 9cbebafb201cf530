# Set-up and everyday commands. `make run` and `make test` install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned: these wheels are available locally on the reference machines; a looser torch
# requirement can pull a multi-GB CUDA build. pyproject.toml accepts a range.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install run test test-all bench wheel clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[eye,report,dev]"
	touch $@

run: install
	$(BIN)/distillkit run plugins/eye_fundus/m3.yaml

# The report's browser test needs Chromium: installed (Debian package) when missing.
test: install
	scripts/ensure_chromium.sh
	$(BIN)/python -m pytest

# Also the integration tests (they use ../shared/datasets/fundus-mix when present).
test-all: install
	scripts/ensure_chromium.sh
	$(BIN)/python -m pytest -m "integration or not integration"

bench: install
	$(BIN)/python -m benchmarks.loop_overhead
	$(BIN)/python -m benchmarks.data_pipeline
	$(BIN)/python -m benchmarks.distillation
	$(BIN)/python -m benchmarks.feature_cache
	$(BIN)/python -m benchmarks.sweep_overhead

wheel: install
	$(BIN)/python -m pip wheel --no-deps -w dist .

clean:
	rm -rf $(VENV) build dist *.egg-info runs
