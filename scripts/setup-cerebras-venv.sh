#!/usr/bin/env bash
# Creates .venv-cerebras, the Cerebras SDK environment (cerebras-pytorch pins torch 2.4, so it cannot
# share .venv), from requirements/cerebras.txt. Idempotent: reinstalls only when that file changed.
# About 5 minutes and 6.4 GB on a fresh machine (torch 2.4 brings its CUDA wheels).
# Usage: scripts/setup-cerebras-venv.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-cerebras
stamp="$venv/.installed-$(sha256sum requirements/cerebras.txt | cut -c1-16)"
if [ ! -x "$venv/bin/python" ]; then
  python3.11 -m venv "$venv"
fi
if [ ! -f "$stamp" ]; then
  echo "[setup] installing the Cerebras SDK into $venv (first run: about 5 minutes)"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r requirements/cerebras.txt
  "$venv/bin/python" -m pip install --quiet --no-deps -e .
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
