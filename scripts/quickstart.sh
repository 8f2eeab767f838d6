#!/usr/bin/env bash
# The main job, from nothing: set up, print the census of every preset, then run
# the tiny model forward on real text (a module of Python's own standard library).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for preset in tiny small perspective-1t; do
  .venv/bin/perspective-info --config "curricula/${preset}.yaml"
  echo
done
TEXT="$(.venv/bin/python -c 'import inspect, textwrap; print(inspect.getsourcefile(textwrap))')"
.venv/bin/perspective-info --config curricula/tiny.yaml --forward-text "$TEXT" --seq-len 512 \
  | tail -n 1
