#!/usr/bin/env bash
# README test command: set up (idempotent) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Two pytest-xdist workers, a test file each at a time (module fixtures stay in one process): the
# suite is mostly XLA compiles, single-threaded, so two workers use both cores. PYTEST_WORKERS=0
# runs it in one process.
.venv/bin/python -m pytest tests -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
