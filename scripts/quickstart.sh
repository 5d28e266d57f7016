#!/usr/bin/env bash
# The README's first command: pre-train a small GPT-2 (configs/gpt2_quickstart.yaml) on Shakespeare,
# end to end, on this machine.
#
# Needs only python3 (>= 3.10) and network access to PyPI: it creates .venv from pyproject.toml if
# needed, then runs the whole Kubeflow pipeline through kfp.local (download, preprocess, validate,
# compile, train, evaluate, promote) with an embedded S3 store (SeaweedFS) and a local MLflow store, all under
# ./work. It ends by printing the S3 locations of the artifacts, the MLflow run ids, the eval
# perplexity, a generated sample and how to open the MLflow UI. A second run reuses the cached steps.
#
# Extra arguments go to `gpt2ops run`, e.g.  scripts/quickstart.sh --max_steps 100 --no_cache
# A killed or failed quickstart continues with  scripts/quickstart.sh --resume
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "quickstart: python3 >= 3.10 is required (found $(python3 --version 2>&1))" >&2; exit 2; }
scripts/setup-venv.sh
case " $* " in
  *" --resume"*) exec .venv/bin/gpt2ops run "$@" ;;  # a resumed run keeps the parameters it started with
esac
exec .venv/bin/gpt2ops run --params gpt2_quickstart --run_name "quickstart-$(date -u +%Y%m%d-%H%M%S)" "$@"
