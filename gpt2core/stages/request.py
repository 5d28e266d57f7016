"""A stage's typed request, and the run-context flags every stage takes.

Each stage module defines ``Request``, a pydantic model derived from ``StageRequest``: its fields, with
their types, defaults and descriptions, are the stage's parameters, defined once. ``gpt2ops <stage>``
builds its flags from them, a launcher that runs the stage in other processes (torchrun ranks,
TrainJob pods, the Cerebras SDK environment, an Argo task) passes the request as those same flags
(``to_args``), and the KFP components construct it from their parameters; see
``gpt2core.flags`` for how a field becomes a flag.
"""

from __future__ import annotations

import argparse
import logging
from typing import Annotated, Any, Self

from pydantic import Field, NonNegativeInt

from gpt2core import flags
from gpt2core.config import Params, load_params, no_effect_keys
from gpt2core.flags import Cli
from gpt2core.platform.context import (ENV_ARTIFACT_ROOT, ENV_EXPERIMENT, ENV_PARENT_RUN, ENV_RUN_ID, RunContext,
                                       process_rank)
from gpt2core.targets import Target

log = logging.getLogger(__name__)


class StageRequest(flags.Parameters):
    """Base of every stage's request: immutable, unknown fields refused, values type-checked, a bad
    value one ConfigError line naming the parameter."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        flags.add_arguments(parser, cls)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        return flags.from_args(cls, args)

    def to_args(self) -> list[str]:
        return flags.to_args(self)


class ModelRequest(StageRequest):
    """The request fields of the stages that work on a model config (validate, compile, train,
    evaluate, promote): the config, its overrides, the dataset and the step count."""

    params: str = Field(description="config: a bundled name (gpt2_tiny, gpt2_small, ...), a YAML path "
                                    "or an s3:// URI (the reference's --params)")
    overrides: Annotated[dict[str, Any], Cli(flags=("--set",))] = Field(
        default_factory=dict, description="override a config key, e.g. --set train_input.batch_size=8 "
                                          "(repeatable; the value is read as YAML)")
    dataset: str | None = Field(None, description="a dataset artifact of `gpt2ops preprocess` (folder or "
                                                  "s3:// URI): train on its train/ split, evaluate on its "
                                                  "val/ split (sets train_input.data_dir, eval_input.data_dir)")

    def config_overrides(self) -> dict[str, Any]:
        """The dotted config overrides this request makes: the dataset's splits, then --set (later
        ones win)."""
        overrides: dict[str, Any] = {}
        if self.dataset:
            root = self.dataset.rstrip("/")
            overrides.update({"train_input.data_dir": f"{root}/train", "eval_input.data_dir": f"{root}/val"})
        return {**overrides, **self.overrides}

    def load_params(self) -> Params:
        """The typed config with this request's overrides applied (ConfigError naming the key)."""
        return load_params(self.params, self.config_overrides())


class TrainingRequest(ModelRequest):
    """ModelRequest for the stages that prepare or run training (validate, compile, train)."""

    target: Target = Field("cpu", description="where training runs: cpu, gpu (CUDA; several GPUs under "
                                              "torchrun) or cerebras (the Cerebras SDK)")
    # 0 means what it means in the run form (gpt2core.pipeline_parameters): an orchestrator passes the
    # form's value through as this flag, and cannot leave a flag out.
    max_steps: NonNegativeInt | None = Field(None, description="override runconfig.max_steps (0: keep the "
                                                               "config's)")

    def config_overrides(self) -> dict[str, Any]:
        """ModelRequest's overrides, then max_steps (unless 0)."""
        overrides = super().config_overrides()
        if self.max_steps:
            overrides["runconfig.max_steps"] = self.max_steps
        return overrides

    def load_params(self) -> Params:
        """ModelRequest's config; the keys it sets that change nothing on ``target`` are logged, once
        (by rank 0 of a torchrun job)."""
        params = super().load_params()
        for note in no_effect_keys(params, self.target) if process_rank() == 0 else ():
            log.info("%s: %s", self.params, note)
        return params


def add_context_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the run context every stage accepts; each falls back to its environment variable."""
    g = parser.add_argument_group("pipeline run")
    g.add_argument("--pipeline_run_id", help=f"pipeline run id (env {ENV_RUN_ID}; default: new)")
    g.add_argument("--artifact_root", help=f"local folder or s3://bucket/prefix (env {ENV_ARTIFACT_ROOT})")
    g.add_argument("--experiment", help=f"MLflow experiment (env {ENV_EXPERIMENT}; default gpt2ops)")
    g.add_argument("--parent_run_id", help=f"MLflow parent run id (env {ENV_PARENT_RUN})")


def context_from_args(args: argparse.Namespace) -> RunContext:
    return RunContext.from_env(pipeline_run_id=args.pipeline_run_id, artifact_root=args.artifact_root,
                               experiment=args.experiment, parent_run_id=args.parent_run_id)


def context_args(ctx: RunContext) -> list[str]:
    """The flags that give ``ctx`` to a stage run in another process."""
    args = ["--pipeline_run_id", ctx.pipeline_run_id, "--artifact_root", ctx.artifact_root,
            "--experiment", ctx.experiment]
    return args + (["--parent_run_id", ctx.parent_run_id] if ctx.parent_run_id else [])
