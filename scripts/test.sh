#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
JAX_PLATFORMS=cpu exec .venv/bin/python -m pytest tests "$@"
