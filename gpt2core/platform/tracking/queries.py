"""Finding runs and reading what they logged: the parent run of a pipeline run, a stage's run under
it, metric histories, a stage's runs in an experiment, and a finished pipeline run's record."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from gpt2core.errors import TrackingError
from gpt2core.platform.tracking.connection import (mlflow_client, redacted, tracking_errors,
                                                   tracking_uri)
from gpt2core.platform.tracking.tags import (KIND_PIPELINE, MLFLOW_PARENT_RUN,
                                             TAG_ARTIFACT_PREFIX, TAG_ERROR, TAG_KIND, TAG_MODEL_VERSION,
                                             TAG_PIPELINE_RUN, TAG_PROMOTED, TAG_STAGE, published_tag)


def _experiment(client, name: str):  # noqa: ANN001, ANN202 - MlflowClient -> Experiment | None
    with tracking_errors(f"open experiment {name!r}"):
        return client.get_experiment_by_name(name)


def newest_parent_run(client, experiment: str, pipeline_run_id: str):  # noqa: ANN001, ANN201 - MLflow
    """The newest parent run (an MLflow ``Run``) tagged with pipeline_run_id in experiment, or None."""
    found = _experiment(client, experiment)
    if found is None:
        return None
    with tracking_errors(f"find the parent run of pipeline run {pipeline_run_id}"):
        runs = client.search_runs(
            [found.experiment_id],
            filter_string=(f"tags.`{TAG_PIPELINE_RUN}` = '{pipeline_run_id}' and "
                           f"tags.`{TAG_KIND}` = '{KIND_PIPELINE}'"),
            order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def find_parent_run(pipeline_run_id: str, experiment: str) -> str:
    """The id of the (newest) parent run opened for a pipeline run, found by its pipeline-run-id
    tag; TrackingError naming the id when there is none."""
    parent = newest_parent_run(mlflow_client(), experiment, pipeline_run_id)
    if parent is None:
        raise TrackingError(f"no MLflow parent run tagged {TAG_PIPELINE_RUN}={pipeline_run_id} in "
                            f"experiment {experiment!r} at {redacted(tracking_uri())}")
    return parent.info.run_id


def stage_run_id(parent_run_id: str, stage: str) -> str | None:
    """The newest child run of parent_run_id for `stage` (by its stage tag or run name), or None."""
    client = mlflow_client()
    with tracking_errors(f"find the {stage} run under run {parent_run_id}"):
        parent = client.get_run(parent_run_id)
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.`{MLFLOW_PARENT_RUN}` = '{parent_run_id}'",
                                      order_by=["attributes.start_time DESC"])
    return next((child.info.run_id for child in children
                 if stage in (child.data.tags.get(TAG_STAGE), child.info.run_name)), None)


def metric_histories(run_id: str, metrics: Sequence[str]) -> dict[str, tuple[list[int], list[float]]]:
    """metric -> (steps, values) in step order, for each of metrics the run logged."""
    client = mlflow_client()
    curves = {}
    with tracking_errors(f"read metric history of run {run_id}"):
        for key in metrics:
            history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
            if history:
                curves[key] = ([m.step for m in history], [m.value for m in history])
    return curves


def find_stage_runs(experiment: str, stage: str, *, max_runs: int) -> list:
    """The newest max_runs runs (MLflow ``Run`` objects) of `stage` in `experiment`, newest first;
    TrackingError when the experiment does not exist."""
    client = mlflow_client()
    found = _experiment(client, experiment)
    if found is None:
        raise TrackingError(f"MLflow at {redacted(tracking_uri())}: no experiment named {experiment!r}")
    with tracking_errors(f"search runs of experiment {experiment!r}"):
        return client.search_runs([found.experiment_id], filter_string=f"tags.`{TAG_STAGE}` = '{stage}'",
                                  order_by=["attributes.start_time DESC"], max_results=max_runs)


@dataclass(frozen=True)
class PipelineRunRecord:
    """What a pipeline run left on its MLflow parent run."""

    run_id: str
    experiment_id: str
    pipeline_run_id: str
    status: str  # RUNNING, FINISHED, FAILED, KILLED
    error: str | None
    stage_runs: dict[str, str]  # run name -> run id of its child runs
    artifacts: dict[str, str]  # "<stage>/<artifact>" -> URI, sorted
    metrics: dict[str, float]
    model_version: str | None
    promoted: bool


def find_pipeline_run(pipeline_run_id: str, experiment: str) -> PipelineRunRecord | None:
    """What the pipeline run pipeline_run_id left on its parent run in experiment, or None. Of
    several runs of one stage (a resumed run's attempts) ``stage_runs`` names the newest."""
    client = mlflow_client()
    parent = newest_parent_run(client, experiment, pipeline_run_id)
    if parent is None:
        return None
    with tracking_errors(f"find the stage runs of pipeline run {pipeline_run_id}"):
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.`{MLFLOW_PARENT_RUN}` = '{parent.info.run_id}'",
                                      order_by=["attributes.start_time ASC"])
    tags = parent.data.tags
    return PipelineRunRecord(
        run_id=parent.info.run_id, experiment_id=parent.info.experiment_id,
        pipeline_run_id=pipeline_run_id, status=parent.info.status, error=tags.get(TAG_ERROR),
        stage_runs={child.info.run_name: child.info.run_id for child in children},
        artifacts={key.removeprefix(TAG_ARTIFACT_PREFIX): uri for key, uri in sorted(tags.items())
                   if key.startswith(TAG_ARTIFACT_PREFIX)},
        metrics=dict(parent.data.metrics), model_version=tags.get(TAG_MODEL_VERSION),
        promoted=tags.get(TAG_PROMOTED) == "True")


def published_record(name: str, uri: str, digest: str) -> str | None:
    """The id of a stage run that recorded publishing artifact ``name`` at uri with this manifest
    digest (``record_published``), in any experiment of the tracking store; None when none did.
    What a stage recorded in MLflow is the trust anchor for an artifact whose files get unpickled:
    whoever can write the artifact's storage cannot write these records."""
    client = mlflow_client()
    with tracking_errors(f"look up who published {uri}"):
        experiments = [e.experiment_id for e in client.search_experiments()]
        if not experiments:
            return None
        key, value = published_tag(name, uri, digest)
        runs = client.search_runs(experiments, filter_string=f"tags.`{key}` = '{value}'", max_results=1)
    return runs[0].info.run_id if runs else None


def runs_page(experiment_id: str, pipeline_run_id: str) -> str:
    """The MLflow UI page (the part of its URL after the host) listing a pipeline run's runs, the
    parent and one per stage, each with the datasets it read and wrote, in the order they ended.

    MLflow 3.17's UI opens an experiment as its GenAI/Model-training switch says (``workflowType``,
    else the last choice, at first GenAI), not by the experiment's kind tag. A search filter and an
    order other than by start time list the stage runs flat instead of folded under their parent."""
    query = urlencode({"workflowType": "machine_learning",
                       "searchFilter": f"tags.`{TAG_PIPELINE_RUN}` = '{pipeline_run_id}'",
                       "orderByKey": "attributes.end_time", "orderByAsc": "true"}, quote_via=quote)
    return f"#/experiments/{experiment_id}/runs?{query}"
