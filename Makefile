# Two commands do all the set-up on a fresh machine:
#   make run    - create .venv, install, start the app on the embedded tiny model
#   make test   - create .venv, install with test extras (+ Debian chromium when possible), run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run test install install-test browser clean screenshots

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
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
	LORA_STUDIO_SCREENSHOTS=$(CURDIR)/docs/screenshots $(PY) -m pytest -q tests/ui/test_browser.py tests/ui/test_lora_browser.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
