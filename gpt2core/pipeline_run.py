"""A pipeline run's own bookkeeping, one way for every orchestrator: open its MLflow parent run and
check the run form (``start``), put the outcome on the parent run (``record``), close it FINISHED or
FAILED whatever happened (``end``).

The KFP pipeline's bookkeeping components (``components/pipeline_run``) call these functions; an
Argo workflow runs them as commands::

    gpt2ops pipeline-run start  --pipeline_run_id ID [run-form flags] [--output_file PATH]
    gpt2ops pipeline-run record --pipeline_run_id ID --experiment E --result JSON [--result JSON ...]
    gpt2ops pipeline-run end    --pipeline_run_id ID --experiment E --status Succeeded|Failed|Error
                                [--failures JSON]

``start`` writes the parent run id to ``--output_file`` (the stages then log under it with
``--parent_run_id``); ``record`` takes the stages' results (result.json documents); ``end`` takes
the workflow's final status and, as Argo gives them in ``{{workflow.failures}}``, its failed nodes.
The parent run is found by its pipeline-run-id tag, so ``record`` and ``end`` need nothing from
``start`` but the pipeline run id.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gpt2core import flags
from gpt2core.errors import ConfigError, TrackingError
from gpt2core.pipeline_parameters import PipelineParameters
from gpt2core.platform.context import RunContext
from gpt2core.platform.results import StageResult

log = logging.getLogger(__name__)

# The stage whose result is the registry's decision: the parent run records its model version and
# whether it was promoted (tags), not its decision folder.
DECIDING_STAGE = "promote"
SUCCEEDED = "Succeeded"  # Argo's {{workflow.status}} of a run that succeeded; Failed and Error did not


def start(ctx: RunContext, form: Mapping[str, Any]) -> str:
    """Open the MLflow parent run of the pipeline run ``ctx.pipeline_run_id`` (named
    ``form["run_name"]`` when given, the form logged as its params), then check the form, so a bad
    value fails here, recorded on the parent run, before any data moves. Returns the parent run id
    ("" when the form names no experiment); ConfigError naming the parameter for a bad value."""
    from gpt2core.platform import tracking

    parent_run_id = ""
    if str(ctx.experiment).strip():  # else there is no experiment to record in: the check names the parameter
        parent_run_id = tracking.start_pipeline_run(ctx, params=form, run_name=form.get("run_name") or None)
    PipelineParameters(**form).check()
    return parent_run_id


def record(pipeline_run_id: str, experiment: str, *, artifacts: Mapping[str, str],
           eval_metrics: Mapping[str, float], model_version: str, promoted: bool) -> str:
    """Put a pipeline run's outcome on its parent run (found by its pipeline-run-id tag): every
    artifact URI (``<stage>/<artifact>`` -> URI; also those of stages served from a cache, which
    logged under an earlier parent), the eval metrics, the registered model version and whether it
    was promoted. Returns the parent run id; TrackingError when there is none."""
    from gpt2core.platform import tracking

    parent_run_id = tracking.find_parent_run(pipeline_run_id, experiment)
    tracking.record_pipeline_results(parent_run_id, artifacts=artifacts, metrics=eval_metrics,
                                     model_version=model_version, promoted=promoted)
    return parent_run_id


def record_results(pipeline_run_id: str, experiment: str, results: Iterable[StageResult]) -> str:
    """``record`` from the stages' results: the artifacts of every stage but promote, the eval
    metrics of evaluate, the model version and decision of promote. ConfigError when a result is
    missing or failed."""
    by_stage = {result.stage: result for result in results}
    for stage in ("evaluate", DECIDING_STAGE):
        if stage not in by_stage:
            raise ConfigError(f"--result: no result of the {stage} stage among those given "
                              f"({', '.join(by_stage) or 'none'})")
    failed = [stage for stage, result in by_stage.items() if result.status != "succeeded"]
    if failed:
        raise ConfigError(f"--result: the {', '.join(failed)} stage failed; a failed run's outcome is not recorded")
    decision = by_stage[DECIDING_STAGE].metrics
    return record(pipeline_run_id, experiment,
                  artifacts={f"{stage}/{name}": uri for stage, result in by_stage.items()
                             if stage != DECIDING_STAGE for name, uri in result.outputs.items()},
                  eval_metrics=by_stage["evaluate"].metrics,
                  model_version=str(int(decision["promote/version"])),
                  promoted=bool(decision["promote/promoted"]))


def end(pipeline_run_id: str, experiment: str, *, succeeded: bool, error: str | None = None) -> None:
    """Close the parent run FINISHED, or FAILED with ``error`` tagged; nothing to do (logged) when
    the run never got a parent run (its start failed before opening one)."""
    from gpt2core.platform import tracking

    try:
        parent_run_id = tracking.find_parent_run(pipeline_run_id, experiment)
    except TrackingError as exc:
        log.warning("no parent run to close: %s", exc)
        return
    tracking.end_pipeline_run(parent_run_id, "FINISHED" if succeeded else "FAILED",
                              error=None if succeeded else (error or "the pipeline run failed"))


def failure_summary(status: str, failures_json: str) -> str:
    """One line from Argo's ``{{workflow.failures}}`` (a JSON list of failed nodes, or ``null``):
    ``<node>: <message>`` of each, else the workflow status."""
    try:
        failures = json.loads(failures_json or "null") or []
    except json.JSONDecodeError:
        return f"workflow {status}: {failures_json}"
    parts = [f"{f.get('displayName', '?')}: {f.get('message') or f.get('phase', status)}"
             for f in failures if isinstance(f, dict)]
    return "; ".join(parts) or f"workflow {status}"


# ---------------------------------------------------------------- gpt2ops pipeline-run

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def run_id(p: argparse.ArgumentParser) -> None:
        p.add_argument("--pipeline_run_id", required=True,
                       help="the pipeline run (Argo: {{workflow.uid}}); tags its parent run")

    p = sub.add_parser("start", help="open the parent run, then check the run form")
    run_id(p)
    flags.add_arguments(p.add_argument_group("run form (default: the pipeline's)"), PipelineParameters)
    p.add_argument("--output_file", metavar="PATH", help="write the parent run id to this local file")

    p = sub.add_parser("record", help="put the stages' results on the parent run")
    run_id(p)
    p.add_argument("--experiment", default="gpt2ops", help="MLflow experiment of the parent run")
    p.add_argument("--result", action="append", default=[], metavar="JSON", type=_stage_result,
                   help="a stage's result (its result.json); repeat for each stage of the run")

    p = sub.add_parser("end", help="close the parent run FINISHED or FAILED")
    run_id(p)
    p.add_argument("--experiment", default="gpt2ops", help="MLflow experiment of the parent run")
    p.add_argument("--status", required=True, help=f"the run's final status: {SUCCEEDED} closes it "
                                                   "FINISHED, anything else (Failed, Error) FAILED")
    p.add_argument("--failures", default="null", metavar="JSON",
                   help="the failed nodes, as Argo's {{workflow.failures}} lists them")


def main(args: argparse.Namespace) -> int:
    if args.action == "start":
        form = {name: getattr(args, name) for name in PipelineParameters.model_fields if hasattr(args, name)}
        where = PipelineParameters(**form)  # the flags' types are checked: only the defaults are new
        ctx = RunContext(pipeline_run_id=args.pipeline_run_id, artifact_root=where.artifact_root,
                         experiment=where.experiment)
        parent_run_id = start(ctx, form)
        if args.output_file:
            Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output_file).write_text(parent_run_id)
        print(f"parent run {parent_run_id} of pipeline run {args.pipeline_run_id}")
    elif args.action == "record":
        parent_run_id = record_results(args.pipeline_run_id, args.experiment, args.result)
        print(f"recorded {len(args.result)} stage results on parent run {parent_run_id}")
    else:
        succeeded = args.status == SUCCEEDED
        end(args.pipeline_run_id, args.experiment, succeeded=succeeded,
            error=None if succeeded else failure_summary(args.status, args.failures))
        print(f"pipeline run {args.pipeline_run_id}: {args.status}")
    return 0


def _stage_result(text: str) -> StageResult:
    from pydantic import ValidationError

    try:
        return StageResult.model_validate_json(text)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(f"not a stage result ({exc.errors()[0]['msg']})") from None
