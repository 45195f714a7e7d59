# `make test` sets everything up on a fresh machine and runs the default test suite.
# `make demo` sets everything up and runs the main job (`recognite demo`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test test-slow demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test,plot]'

test: install
	$(BIN)/pytest -q

test-slow: install
	$(BIN)/pytest -q -m slow

demo: install
	$(BIN)/recognite demo

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
