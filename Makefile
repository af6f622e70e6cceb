# medtune: `make demo` (set up, fine-tune SmolLM2-135M-Instruct on the bundled sample and vignettes, compare it with its base on
# MedTuned and on the consultation vignettes, answer a question), `make test` (set up + full test suite), `make lint` (ruff, configured in pyproject.toml),
# `make local` (llama-cpp-python, and the demo's model as a GGUF, to run it privately on a CPU).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO := outputs/demo
QUESTION := I have had a fever, a dry cough and a sore throat for three days. What could it be?

.PHONY: setup demo lint test test-fast serve local

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) launch/train.py --config configs/recipes/demo.yaml
	$(VENV)/bin/medtune-eval --model $(DEMO) --baseline --data data/sample/medtuned_sample_eval.jsonl \
		data/vignettes/heldout.jsonl --out $(DEMO) --max-new-tokens 64 --batch-size 48
	$(VENV)/bin/medtune-chat --model $(DEMO) --temperature 0 --max-tokens 96 --ask "$(QUESTION)"
	@echo
	@echo "Web chat with the fine-tuned model:  $(VENV)/bin/medtune-serve --model $(DEMO)   then open http://127.0.0.1:8000/"
	@echo "Privately on this machine's CPU with llama.cpp:  make local   (builds llama-cpp-python once, writes"
	@echo "  $(DEMO)/export/model-q8_0.gguf and its Ollama Modelfile), then"
	@echo "  $(VENV)/bin/medtune-serve --model $(DEMO)/export/model-q8_0.gguf"
	@echo "With Ollama:  cd $(DEMO)/export && ollama create medtune-demo -f model-q8_0.Modelfile && ollama run medtune-demo"

lint: setup
	$(VENV)/bin/ruff check .

test: setup
	bash scripts/setup.sh --system
	bash scripts/setup.sh --llama-cpp
	$(PY) -m pytest

# llama-cpp-python (built once), to chat with and serve GGUF files on a CPU; after make demo, the demo's model as a
# q8_0 GGUF with its Ollama Modelfile. Then: medtune-serve --model outputs/demo/export/model-q8_0.gguf
local: setup
	bash scripts/setup.sh --llama-cpp
	@if [ -f $(DEMO)/adapter_config.json ]; then \
		$(VENV)/bin/medtune-export --model $(DEMO) --out $(DEMO)/export --gguf q8_0 && \
		echo "Privately, on llama.cpp:  $(VENV)/bin/medtune-serve --model $(DEMO)/export/model-q8_0.gguf"; \
	else echo "llama-cpp-python installed; make demo first to have a model to export"; fi

test-fast: setup
	bash scripts/setup.sh --llama-cpp
	$(PY) -m pytest -m "not slow"

serve: setup
	$(VENV)/bin/medtune-serve --model $(DEMO)
