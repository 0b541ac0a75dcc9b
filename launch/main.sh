#!/usr/bin/env bash
# The main job: set up, train a tiny OpenMoE with UL2 on the embedded corpus, checkpoint,
# evaluate the checkpoint on the validation split, sample.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
workdir="${WORKDIR:-runs/tiny_openmoe_ul2}"
python launch/train.py --gin_file=gin/experiments/tiny_openmoe_ul2.gin --workdir="$workdir" "$@"
python launch/eval.py --workdir="$workdir" --no_progress  # full validation pass, per denoiser
python launch/sample.py --workdir="$workdir" --prompt="def fibonacci(n):" --max_new_tokens=64 \
    --temperature=0.8 --top_p=0.95 --seed=0  # greedy decoding of a 300-step model loops
