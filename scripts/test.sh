#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU, one pytest worker per
# core (TEST_WORKERS=N to choose, 0 for a single process; extra arguments go to
# pytest, e.g. `bash scripts/test.sh -k infer`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
JAX_PLATFORMS=cpu exec .venv/bin/python -m pytest tests -n "${TEST_WORKERS:-auto}" \
  --dist worksteal "$@"
