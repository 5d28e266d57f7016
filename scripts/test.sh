#!/usr/bin/env bash
# The full test suite, on a fresh machine: installs what the tests need from the project's own
# files, starts the services they use, and runs pytest. `.ci/run` calls exactly this.
#
#   scripts/test.sh                 # everything (as root it also installs and starts Docker)
#   scripts/test.sh tests/test_model.py -x   # arguments go to pytest
#
# What it sets up:
#   .venv            the project with its test extras (pyproject.toml)
#   .venv-cerebras   the Cerebras SDK environment (requirements/cerebras.txt; torch 2.4)
#   Docker           as root: docker.io + debootstrap from Debian, dockerd, the gpt2ops-cpu image
#                    (without root and without a running daemon the docker tests are skipped)
#   chromium         as root: Debian's chromium, for the MLflow UI test (without it, that test is skipped)
# SeaweedFS (S3) and MLflow are started by the tests themselves, from the .venv packages.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "[test.sh $(date -u +%H:%M:%S)] $*"; }

log "python environment (.venv)"
scripts/setup-venv.sh test

# The SDK download is network-bound and the image build CPU-bound: run them side by side.
log "Cerebras SDK environment (.venv-cerebras), in the background"
scripts/setup-cerebras-venv.sh > /tmp/gpt2ops-cerebras-venv.log 2>&1 &
cerebras_setup=$!

if [ "$(id -u)" = 0 ] && ! docker info > /dev/null 2>&1; then
  if ! command -v dockerd > /dev/null || ! command -v debootstrap > /dev/null; then
    log "installing docker.io and debootstrap"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap > /dev/null
  fi
  log "starting dockerd"
  (dockerd --iptables=false > /tmp/gpt2ops-dockerd.log 2>&1 &)
  for _ in $(seq 60); do docker info > /dev/null 2>&1 && break; sleep 1; done
fi
if docker info > /dev/null 2>&1; then
  log "building the gpt2ops-cpu image"
  .venv/bin/python -m containers.build cpu
  export GPT2OPS_REQUIRE_DOCKER=1  # from here on a docker test that cannot run is a failure
elif [ "$(id -u)" = 0 ]; then
  tail -20 /tmp/gpt2ops-dockerd.log >&2 || true
  log "dockerd did not start (log above)"
  exit 1
else
  log "no Docker daemon and not root: the docker tests will be skipped"
fi

# The MLflow UI test looks at the UI in a real browser: Debian's chromium, headless.
if [ "$(id -u)" = 0 ] && ! command -v chromium > /dev/null; then
  log "installing chromium (the MLflow UI test's browser)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null
fi
if command -v chromium > /dev/null; then
  export GPT2OPS_REQUIRE_BROWSER=1  # from here on a browser test that cannot run is a failure
else
  log "no chromium and not root: the MLflow UI browser test will be skipped"
fi

if ! wait "$cerebras_setup"; then
  cat /tmp/gpt2ops-cerebras-venv.log >&2
  log "the Cerebras SDK environment could not be created (log above)"
  exit 1
fi
log "running pytest"
exec .venv/bin/python -m pytest "$@"
