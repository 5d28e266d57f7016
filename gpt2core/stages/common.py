"""What every stage shares: its run context, artifact locations, and the tracked stage run.

Contract (see ../shared/DESIGN.md and docs/architecture.md):
- artifacts live at ``<artifact_root>/<pipeline_run_id>/<stage>/<artifact>/``; artifact_root is a
  local folder or ``s3://bucket/prefix``;
- an artifact directory is complete only once its ``MANIFEST.json`` exists (written last);
- every stage runs inside ``stage_run(...)``, an MLflow child run of the pipeline's parent run.
"""

from __future__ import annotations

import argparse

from gpt2core.platform.context import ENV_ARTIFACT_ROOT, ENV_EXPERIMENT, ENV_PARENT_RUN, ENV_RUN_ID, RunContext
from gpt2core.platform.results import StageResult  # noqa: F401 - re-exported until the stage contract lands


def add_context_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every stage accepts; each falls back to its environment variable."""
    g = parser.add_argument_group("pipeline run")
    g.add_argument("--pipeline_run_id", help=f"pipeline run id (env {ENV_RUN_ID}; default: new)")
    g.add_argument("--artifact_root", help=f"local folder or s3://bucket/prefix (env {ENV_ARTIFACT_ROOT})")
    g.add_argument("--experiment", help=f"MLflow experiment (env {ENV_EXPERIMENT}; default gpt2ops)")
    g.add_argument("--parent_run_id", help=f"MLflow parent run id (env {ENV_PARENT_RUN})")


def context_from_args(args: argparse.Namespace) -> RunContext:
    return RunContext.from_env(
        pipeline_run_id=args.pipeline_run_id,
        artifact_root=args.artifact_root,
        experiment=args.experiment,
        parent_run_id=args.parent_run_id,
    )
