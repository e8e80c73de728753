#!/usr/bin/env bash
# Quick start, command 1: set up .venv (once), prepare the bundled MovieLens-100K, train MAGNET
# on it and print the metrics. Extra arguments are config overrides (e.g. train.epochs=5).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
exec .venv/bin/python launch/train.py --config configs/quickstart.yaml "$@"
