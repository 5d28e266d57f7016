"""The run context every stage runs in: which pipeline run, where its artifacts go, where it logs.

Artifacts live at ``<artifact_root>/<pipeline_run_id>/<stage>/<artifact>/``; ``artifact_root`` is a
local folder or ``s3://bucket/prefix``.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

from gpt2core.platform.results import RESULT_FILE
from gpt2core.platform.settings import settings

# The variables a stage's CLI flags fall back to (read through the settings).
ENV_RUN_ID = "GPT2OPS_PIPELINE_RUN_ID"
ENV_ARTIFACT_ROOT = "GPT2OPS_ARTIFACT_ROOT"
ENV_PARENT_RUN = "GPT2OPS_MLFLOW_PARENT_RUN_ID"
ENV_EXPERIMENT = "MLFLOW_EXPERIMENT_NAME"


@dataclass(frozen=True)
class RunContext:
    """Where a stage of one pipeline run stores artifacts and logs runs."""

    pipeline_run_id: str
    artifact_root: str
    experiment: str = "gpt2ops"
    parent_run_id: str | None = None

    def artifact_uri(self, stage: str, artifact: str) -> str:
        """``<artifact_root>/<pipeline_run_id>/<stage>/<artifact>``: where a stage publishes an artifact."""
        return "/".join([self.artifact_root.rstrip("/"), self.pipeline_run_id, stage, artifact])

    def result_uri(self, stage: str) -> str:
        """``<artifact_root>/<pipeline_run_id>/<stage>/result.json``: the stage run's result file."""
        return "/".join([self.artifact_root.rstrip("/"), self.pipeline_run_id, stage, RESULT_FILE])

    @classmethod
    def from_env(cls, **overrides: str | None) -> RunContext:
        """The context the settings give (a new pipeline run id, ``./work/artifacts`` when unset),
        with overrides (the CLI's flags) that are not None taking precedence."""
        s = settings()
        values = {
            "pipeline_run_id": s.pipeline_run_id or new_pipeline_run_id(),
            "artifact_root": s.artifact_root or os.path.abspath("work/artifacts"),
            "experiment": s.mlflow_experiment_name,
            "parent_run_id": s.mlflow_parent_run_id,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def new_pipeline_run_id() -> str:
    """A fresh pipeline run id (12 hex digits) for a run that no orchestrator named."""
    return uuid.uuid4().hex[:12]


def process_rank() -> int:
    """This process's rank in a distributed job (torchrun's ``RANK``; 0 when not under torchrun).
    Rank 0 alone tracks in MLflow, publishes artifacts and writes the stage's result file."""
    return int(os.environ.get("RANK", "0"))
