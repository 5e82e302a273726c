# The README's two commands live here so that the README, CI and people run the same thing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint

$(BIN)/abrec: pyproject.toml
	$(PY) -m venv $(VENV)
	# CPU build of PyTorch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/abrec

install: $(BIN)/abrec

demo: install
	$(BIN)/abrec demo

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -q
