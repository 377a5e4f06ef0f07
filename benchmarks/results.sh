#!/usr/bin/env bash
# make results: every model on the real data, then results/*.json and the README table.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python benchmarks/results.py "$@"
