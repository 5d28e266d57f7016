"""Experiment tracking (MLflow): a parent run per pipeline run, a child run per stage.

PLACEHOLDER (logs to the console) until the MLflow implementation lands; the signatures are the
contract: `with stage_run("train", ctx, params=flat_config) as run: run.log_metrics({...}, step=i)`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

from gpt2core.stages.common import RunContext

log = logging.getLogger(__name__)


class StageRun:
    def __init__(self, stage: str, ctx: RunContext):
        self.stage, self.ctx, self.run_id = stage, ctx, None

    def log_params(self, params: Mapping[str, object]) -> None:
        log.debug("%s params: %s", self.stage, dict(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        log.debug("%s metrics step=%s: %s", self.stage, step, dict(metrics))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        log.debug("%s artifact: %s -> %s", self.stage, path, artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        log.debug("%s tags: %s", self.stage, dict(tags))


@contextlib.contextmanager
def stage_run(stage: str, ctx: RunContext, *, params: Mapping[str, object] | None = None,
              tags: Mapping[str, str] | None = None) -> Iterator[StageRun]:
    run = StageRun(stage, ctx)
    if params:
        run.log_params(params)
    if tags:
        run.set_tags(tags)
    yield run
