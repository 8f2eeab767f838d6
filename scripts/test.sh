#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU, one pytest worker per
# core up to 4 (each worker holds its own JAX runtime and 8 fake devices);
# TEST_WORKERS=N to choose, 0 for a single process. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -k infer`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cores=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
workers="${TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}"
JAX_PLATFORMS=cpu exec .venv/bin/python -m pytest tests -n "$workers" \
  --dist worksteal "$@"
