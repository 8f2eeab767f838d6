#!/usr/bin/env bash
# The main job, from nothing: set up, print the parameter census of the presets,
# then run the tiny curriculum (dense → upcycle → sparse → ternary → align) on the
# default corpus (Python's standard-library source) and print a sample from the
# final (aligned, ternary) model; then export it to a streaming model directory and
# generate with perspective-infer (experts streamed disk → host → device).
# Re-running resumes (finished stages are skipped) and re-exports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for preset in tiny perspective-1t; do
  .venv/bin/perspective-info --config "curricula/${preset}.yaml"
  echo
done
.venv/bin/perspective-train --stage all --config curricula/tiny.yaml \
  --run-dir runs/quickstart "$@"
.venv/bin/perspective-export --run-dir runs/quickstart --out models/tiny --force
.venv/bin/perspective-infer --model-dir models/tiny "def load_config(path):" \
  --max-tokens 120 --host-budget-mb 0.5 --stats
