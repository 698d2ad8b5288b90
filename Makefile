# Two commands do all the set-up on a fresh machine:
#   make run    - create .venv, install, start the app on the embedded tiny model
#   make test   - create .venv, install with test extras (+ Debian chromium when possible), run the tests
# TORCH picks the PyTorch build (tools/install_torch.py): auto (default) = the CPU build from PyTorch's
# CPU index where no NVIDIA GPU is present, the CUDA build where one is; TORCH=cpu / TORCH=cuda force
# either. A torch already in .venv that fits is kept.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
TORCH ?= auto

.PHONY: run test install install-test browser clean screenshots gpu-wheels

# One stamp per TORCH value, so that `make run TORCH=cuda` after a CPU install looks again.
$(VENV)/.torch-$(TORCH): tools/install_torch.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) tools/install_torch.py --torch $(TORCH)
	rm -f $(VENV)/.torch-*
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch-$(TORCH)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

browser:
	@bash scripts/ensure_chromium.sh

run: install
	$(PY) launch.py $(ARGS)

test: install-test browser
	$(PY) -m pytest $(ARGS)

# Refresh the README's screenshots from the real-browser tests.
screenshots: install-test browser
	LORA_STUDIO_SCREENSHOTS=$(CURDIR)/docs/screenshots $(PY) -m pytest -q tests/ui/test_browser.py tests/ui/test_lora_browser.py \
		tests/ui/test_newcomer_browser.py tests/ui/test_grid_browser.py

# The packages the GPU machine's image lacks, as wheels for scripts/gpu_check.sh (carried as .whl).
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
		diffusers==0.42.1 platformdirs==4.14.9 tomli-w==1.2.0 importlib-metadata==10.2.0

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
