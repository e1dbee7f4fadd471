#!/usr/bin/env bash
# The GPU check (issue 17): run on a machine with an accelerator, from the repository root, with only
# torch + transformers importable beside this checkout (no ray, vLLM or DeepSpeed needed; no install).
# Prints one table; under 8 minutes on one H100/H200. `--quick` is a CPU smoke run of the same code.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"
exec "$PY" benchmarks/gpu_check.py "$@"
