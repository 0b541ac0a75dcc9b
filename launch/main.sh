#!/usr/bin/env bash
# The main job: set up, train a tiny OpenMoE with UL2 on the embedded corpus, checkpoint, sample.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
workdir="${WORKDIR:-runs/tiny_openmoe_ul2}"
python launch/train.py --gin_file=gin/experiments/tiny_openmoe_ul2.gin --workdir="$workdir" "$@"
python launch/sample.py --workdir="$workdir" --prompt="def fibonacci(n):" --max_new_tokens=64
