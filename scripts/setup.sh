#!/usr/bin/env bash
# Create .venv (if missing) and install Perspective-JAX with its test extras.
# Usage: bash scripts/setup.sh      (PYTHON=python3.12 to pick an interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
