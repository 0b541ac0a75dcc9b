#!/usr/bin/env bash
# Set up and run the test suite (CPU, 8 fake devices; see tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
python -m pytest -n 2 -q tests "$@"
