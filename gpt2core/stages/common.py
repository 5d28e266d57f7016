"""What every stage shares: its run context, artifact locations, and the tracked stage run.

Contract (see ../shared/DESIGN.md and docs/architecture.md):
- artifacts live at ``<artifact_root>/<pipeline_run_id>/<stage>/<artifact>/``; artifact_root is a
  local folder or ``s3://bucket/prefix``;
- an artifact directory is complete only once its ``MANIFEST.json`` exists (written last);
- every stage runs inside ``stage_run(...)``, an MLflow child run of the pipeline's parent run.
"""

from __future__ import annotations

import argparse
import os
import uuid
from dataclasses import dataclass, field

ENV_RUN_ID = "GPT2OPS_PIPELINE_RUN_ID"
ENV_ARTIFACT_ROOT = "GPT2OPS_ARTIFACT_ROOT"
ENV_PARENT_RUN = "GPT2OPS_MLFLOW_PARENT_RUN_ID"
ENV_EXPERIMENT = "MLFLOW_EXPERIMENT_NAME"


@dataclass
class StageResult:
    """What a stage returns: artifact name -> URI, and its headline metrics."""

    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RunContext:
    """Where a stage of one pipeline run stores artifacts and logs runs."""

    pipeline_run_id: str
    artifact_root: str
    experiment: str = "gpt2ops"
    parent_run_id: str | None = None

    def artifact_uri(self, stage: str, artifact: str) -> str:
        return "/".join([self.artifact_root.rstrip("/"), self.pipeline_run_id, stage, artifact])

    @classmethod
    def from_env(cls, **overrides: str | None) -> RunContext:
        values = {
            "pipeline_run_id": os.environ.get(ENV_RUN_ID) or uuid.uuid4().hex[:12],
            "artifact_root": os.environ.get(ENV_ARTIFACT_ROOT) or os.path.abspath("work/artifacts"),
            "experiment": os.environ.get(ENV_EXPERIMENT) or "gpt2ops",
            "parent_run_id": os.environ.get(ENV_PARENT_RUN) or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


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
