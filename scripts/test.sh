#!/usr/bin/env bash
# Quick start, command 2: set up .venv (once) and run the whole test suite (unit + integration:
# real Ray, real DGL servers, real gloo groups). Extra arguments go to pytest (e.g. -m "not integration").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
set +e
.venv/bin/python -m pytest -ra --durations=15 "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
    echo "[test] pytest collected no tests: treating as a failure" >&2
    exit 1
fi
exit $rc
