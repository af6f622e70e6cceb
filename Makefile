# medtune: `make demo` (set up, fine-tune SmolLM2-135M-Instruct on the bundled sample and vignettes, compare it with its base on
# MedTuned and on the consultation vignettes, answer a question), `make test` (set up + full test suite), `make lint` (ruff, configured in pyproject.toml).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO := outputs/demo
QUESTION := I have had a fever, a dry cough and a sore throat for three days. What could it be?

.PHONY: setup demo lint test test-fast serve

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) launch/train.py --config configs/recipes/demo.yaml
	$(VENV)/bin/medtune-eval --model $(DEMO) --baseline --data data/sample/medtuned_sample_eval.jsonl \
		data/vignettes/heldout.jsonl --out $(DEMO) --max-new-tokens 64 --batch-size 48
	$(VENV)/bin/medtune-chat --model $(DEMO) --temperature 0 --max-tokens 96 --ask "$(QUESTION)"
	@echo
	@echo "Web chat with the fine-tuned model:  $(VENV)/bin/medtune-serve --model $(DEMO)   then open http://127.0.0.1:8000/"

lint: setup
	$(VENV)/bin/ruff check .

test: setup
	bash scripts/setup.sh --system
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

serve: setup
	$(VENV)/bin/medtune-serve --model $(DEMO)
