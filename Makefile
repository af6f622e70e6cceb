# medtune: `make demo` (set up + train the tiny demo + answer a question), `make test` (set up + full test suite),
# `make lint` (ruff, configured in pyproject.toml).
VENV ?= .venv
PY := $(VENV)/bin/python
TINY := .cache/tiny-starling

.PHONY: setup demo lint test test-fast serve

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m medtune.tiny --out $(TINY)
	$(PY) launch/train.py --config configs/recipes/tiny.yaml
	@echo
	@echo "Web chat with the demo adapter:  $(VENV)/bin/medtune-serve --model outputs/tiny   then open http://127.0.0.1:8000/"

lint: setup
	$(VENV)/bin/ruff check .

test: setup
	bash scripts/setup.sh --system
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

serve: setup
	$(VENV)/bin/medtune-serve --model outputs/tiny
