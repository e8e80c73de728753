#!/usr/bin/env bash
# Create .venv/ at the repository root and install magnet_dist with its pinned stack.
# Idempotent: a stamp keyed on pyproject.toml's hash skips the install when nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
VENV="$ROOT/.venv"
STAMP="$VENV/.magnet_dist_installed"
WANT="$(sha256sum pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    echo "[setup] .venv is up to date ($WANT)"
    exit 0
fi

start=$(date +%s)
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
"${PIP[@]}" -q --upgrade "pip<25" wheel
# torch (and the build tools) first: deepspeed's setup.py imports torch, so it is built
# without build isolation against the torch we pin.
echo "[setup] installing torch 2.2.1 and build prerequisites (large download, a few minutes)"
"${PIP[@]}" -q "torch==2.2.1" "numpy==1.26.4" "setuptools<70" pybind11 ninja packaging
echo "[setup] building deepspeed 0.18.2 against torch 2.2.1"
DS_BUILD_OPS=0 "${PIP[@]}" -q --no-build-isolation "deepspeed==0.18.2"
echo "[setup] installing magnet_dist and the rest of the stack"
"${PIP[@]}" -q -e ".[text,dev]"
"$VENV/bin/python" -m pip check
echo "$WANT" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - start )) s; venv size $(du -sh "$VENV" | cut -f1)"
