#!/usr/bin/env bash
# The full test suite, on a fresh machine: installs what the tests need from the project's own
# files, starts the services they use, and runs pytest. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh test
exec .venv/bin/python -m pytest "$@"
