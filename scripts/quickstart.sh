#!/usr/bin/env bash
# The main job, from nothing: set up, print the parameter census of the presets,
# then train the tiny dense model on the default corpus (Python's standard
# library source) and print a generated sample. Re-running resumes the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for preset in tiny perspective-1t; do
  .venv/bin/perspective-info --config "curricula/${preset}.yaml"
  echo
done
.venv/bin/perspective-train --stage dense --config curricula/tiny.yaml \
  --run-dir runs/quickstart-dense "$@"
