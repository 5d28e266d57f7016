"""Runs: the parent run of a pipeline run, a child run per stage, and what gets logged on them."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from gpt2core.errors import TrackingError
from gpt2core.platform.artifacts import NotFound, manifest_digest
from gpt2core.platform.artifacts.store import find_artifact
from gpt2core.platform.context import RunContext
from gpt2core.platform.tracking.connection import (experiment_id, git_sha, mlflow_client, redacted,
                                                   tracking_errors, tracking_uri)
from gpt2core.platform.tracking.plots import LOSS_CURVE_FILE, loss_curve_png
from gpt2core.platform.tracking.queries import newest_parent_run
from gpt2core.platform.tracking.registry import (MODEL_ARTIFACT, default_model_name, find_model_version,
                                                 model_requirements)
from gpt2core.platform.tracking.tags import (KIND_PIPELINE, KIND_STAGE, MLFLOW_DATASET_CONTEXT,
                                             MLFLOW_GIT_COMMIT, TAG_ARTIFACT_PREFIX, TAG_ERROR, TAG_GIT_SHA,
                                             TAG_KIND, TAG_MODEL_URI, TAG_MODEL_VERSION, TAG_PIPELINE_RUN,
                                             TAG_PROMOTED, TAG_STAGE, published_tag)

log = logging.getLogger(__name__)

_MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
_MAX_ERROR_CHARS = 5000
# Params never logged, whatever a config carries: credentials belong in the environment only.
_SECRET_KEY = re.compile(r"secret|password|passwd|credential|access_key|session_token|api_key|"
                         r"private_key", re.IGNORECASE)
# ...except where a key only says where a credential is (runconfig.credentials_path, the Cerebras
# cluster's TLS certificate): the location is worth comparing between runs, and is no secret.
_LOCATION_KEY = re.compile(r"_(path|file|dir)$", re.IGNORECASE)


def _base_tags(ctx: RunContext, kind: str) -> dict[str, str]:
    sha = git_sha()
    return {TAG_PIPELINE_RUN: ctx.pipeline_run_id, TAG_KIND: kind, TAG_GIT_SHA: sha, MLFLOW_GIT_COMMIT: sha}


def _loggable_params(params: Mapping[str, object]) -> dict[str, str]:
    values = {}
    for key, value in params.items():
        if _SECRET_KEY.search(key) and not _LOCATION_KEY.search(key):
            log.warning("param %r looks like a credential: not logged to MLflow", key)
            continue
        text = "" if value is None else str(value)
        values[key] = text if len(text) <= _MAX_PARAM_CHARS else text[:_MAX_PARAM_CHARS - 3] + "..."
    return values


def _log_batch(client, run_id: str, action: str, *, metrics: Mapping[str, float] | None = None,  # noqa: ANN001
               tags: Mapping[str, str] | None = None, step: int = 0) -> None:
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    with tracking_errors(f"{action} run {run_id}"):
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
                         tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])


@dataclasses.dataclass(frozen=True)
class DatasetUse:
    """A dataset (or a split of one, or a corpus) a stage read or wrote, for ``StageRun.log_datasets``.

    ``context`` says what the stage did with it (``tags.DATASET_*``); ``profile`` holds what it
    contains, e.g. ``{"num_sequences": 5978, "num_tokens": 1530368, "max_seq_length": 256}``."""

    uri: str
    context: str
    profile: Mapping[str, object] = dataclasses.field(default_factory=dict)


# MLflow keeps at most 36 characters of a dataset digest; the full one is the runs' dataset-hash tag.
_DIGEST_CHARS = 12


def _dataset_entity(use: DatasetUse):  # noqa: ANN202 - mlflow.entities.Dataset
    """The MLflow dataset of ``use``: named ``<artifact>/<folder inside it>`` (``dataset/train``),
    its digest the artifact's manifest digest (``artifact_digest``), its source the URI."""
    from mlflow.entities import Dataset

    uri = use.uri.rstrip("/")
    try:
        artifact, manifest, sub = find_artifact(uri)
        name, digest = "/".join(p for p in (artifact.rsplit("/", 1)[-1], sub) if p), manifest_digest(manifest)
    except NotFound:  # a plain folder, e.g. data made outside gpt2ops: no content digest to give
        name, digest = "/".join(uri.split("/")[-2:]), "unversioned"
    scheme = uri.split("://", 1)[0] if "://" in uri else "local"
    source = {"url": uri} if scheme in ("http", "https") else {"uri": uri}
    return Dataset(name=name, digest=digest[:_DIGEST_CHARS], source_type=scheme, source=json.dumps(source),
                   profile=json.dumps(dict(use.profile)) if use.profile else None)


class StageRun:
    """One MLflow run; every call names its run id, so it is safe from any thread."""

    def __init__(self, client, run_id: str, stage: str, ctx: RunContext):  # noqa: ANN001 - an MlflowClient
        self.client, self.run_id, self.stage, self.ctx = client, run_id, stage, ctx

    def log_params(self, params: Mapping[str, object]) -> None:
        from mlflow.entities import Param

        with tracking_errors(f"log params of run {self.run_id}"):
            self.client.log_batch(self.run_id,
                                  params=[Param(k, v) for k, v in _loggable_params(params).items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        _log_batch(self.client, self.run_id, "log metrics of", metrics=metrics, step=step or 0)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a folder's contents, under artifact_path."""
        with tracking_errors(f"upload {path} to run {self.run_id}"):
            if Path(path).is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        _log_batch(self.client, self.run_id, "tag", tags=tags)

    def log_datasets(self, uses: Sequence[DatasetUse]) -> None:
        """Record the datasets this stage read and wrote as MLflow dataset inputs of its run (the
        runs table's Dataset column: the same data shows with the same name and digest in every
        run that made or used it: dataset -> model -> evaluation)."""
        from mlflow.entities import DatasetInput, InputTag

        inputs = [DatasetInput(_dataset_entity(use), tags=[InputTag(MLFLOW_DATASET_CONTEXT, use.context)])
                  for use in uses]
        with tracking_errors(f"log the datasets of run {self.run_id}"):
            self.client.log_inputs(self.run_id, datasets=inputs)

    def log_model_input(self, model_uri: str) -> None:
        """Record the model this stage used, the version ``log_model`` registered from the model
        artifact at ``model_uri``, as an input of its run (the run's page in MLflow's UI names it
        beside its datasets: the evaluation shows what it scored); nothing when no version came
        from that artifact."""
        from mlflow.entities import LoggedModelInput

        name = default_model_name(self.ctx)
        version = find_model_version(name, model_uri)
        if version is None:
            return
        with tracking_errors(f"log model {name!r} version {version} as an input of run {self.run_id}"):
            registered = self.client.get_model_version(name, version)
            # a version of a logged model has its source at models:/<model id> (the sqlite store
            # leaves model_id empty)
            model_id = registered.model_id or registered.source.removeprefix("models:/")
            if model_id.startswith("m-"):
                self.client.log_inputs(self.run_id, models=[LoggedModelInput(model_id)])

    def log_loss_curve(self) -> None:
        """This run's loss histories as one PNG artifact, ``plots/loss_curve.png`` (``loss_curve_png``:
        the same bytes the KFP train step shows); nothing when no loss was logged."""
        png = loss_curve_png(self.run_id)
        if png is None:
            return
        folder, name = LOSS_CURVE_FILE.rsplit("/", 1)
        with tempfile.TemporaryDirectory(prefix="gpt2ops-plot-") as scratch:
            (Path(scratch) / name).write_bytes(png)
            self.log_artifact(Path(scratch) / name, folder)

    def log_model(self, model_dir: str | Path, *, registered_model_name: str | None = None,
                  model_uri: str | None = None) -> str:
        """Log a saved model folder (``model.safetensors`` + ``params.yaml``) as an MLflow model
        and register it; returns the new version. model_uri (the S3 artifact it came from) is
        tagged on the version so later stages find it."""
        import mlflow

        import gpt2core
        from gpt2core import served_model

        name = registered_model_name or default_model_name(self.ctx)
        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            raise TrackingError(f"log_model: run {self.run_id} is not the active MLflow run of this thread")
        with tracking_errors(f"log and register model {name!r}"):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=served_model.__file__, artifacts={MODEL_ARTIFACT: str(model_dir)},
                # the served model imports gpt2core (model, checkpoints, tokenizer, sampling)
                code_paths=[str(Path(gpt2core.__file__).parent)], pip_requirements=model_requirements(),
                registered_model_name=name, await_registration_for=60)
            version = str(info.registered_model_version)
            self.client.set_model_version_tag(name, version, TAG_PIPELINE_RUN, self.ctx.pipeline_run_id)
            if model_uri:
                self.client.set_model_version_tag(name, version, TAG_MODEL_URI, model_uri)
        log.info("registered model %s version %s (run %s)", name, version, self.run_id)
        return version


@contextlib.contextmanager
def stage_run(stage: str, ctx: RunContext, *, params: Mapping[str, object] | None = None,
              tags: Mapping[str, str] | None = None) -> Iterator[StageRun]:
    """The MLflow child run of one stage (under ctx.parent_run_id when set, or under the stage run
    already active in this thread), active in this thread and recording system metrics; ends
    FINISHED, FAILED (error tagged) or KILLED."""
    import mlflow

    client = mlflow_client()
    run_tags = {**_base_tags(ctx, KIND_STAGE), TAG_STAGE: stage,
                **{k: str(v) for k, v in (tags or {}).items() if v is not None}}  # None: not known
    experiment = experiment_id(client, ctx)
    # A stage run inside another one in this thread (promote re-evaluating the champion) nests
    # under it; otherwise it is a child of the pipeline's parent run.
    enclosing = mlflow.active_run()
    with tracking_errors(f"start the {stage} run"):
        active = mlflow.start_run(experiment_id=experiment, run_name=stage, tags=run_tags,
                                  parent_run_id=enclosing.info.run_id if enclosing else ctx.parent_run_id,
                                  nested=enclosing is not None, log_system_metrics=True)
    run = StageRun(client, active.info.run_id, stage, ctx)
    log.info("MLflow run %s (%s) in experiment %r at %s", run.run_id, stage, ctx.experiment,
             redacted(tracking_uri()))
    status = "FAILED"
    try:
        if params:
            run.log_params(params)
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as exc:
        with contextlib.suppress(Exception):  # the stage's own error matters more than this tag
            run.set_tags({TAG_ERROR: f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]})
        raise
    finally:
        with contextlib.suppress(Exception):
            mlflow.end_run(status)


def record_published(run_id: str, artifacts: Mapping[str, tuple[str, str]]) -> None:
    """Record on a stage run the artifacts it published: name -> (URI, manifest digest), as tags
    ``gpt2ops.published.<name>`` that ``published_record`` finds."""
    tags = dict(published_tag(name, uri, digest) for name, (uri, digest) in artifacts.items())
    _log_batch(mlflow_client(), run_id, "record the artifacts of", tags=tags)


def start_pipeline_run(ctx: RunContext, params: Mapping[str, object] | None = None, *,
                       run_name: str | None = None) -> str:
    """Open the parent run of a pipeline run (left RUNNING), named run_name (default
    ``pipeline-<pipeline run id>``); returns its run id. A pipeline run that has one already (an
    earlier attempt of it, continued by ``gpt2ops run --resume``) gets that one back, RUNNING again
    and its error tag removed: one parent run per pipeline run, whatever it took to finish."""
    client = mlflow_client()
    earlier = newest_parent_run(client, ctx.experiment, ctx.pipeline_run_id)
    if earlier is not None:
        run_id = earlier.info.run_id
        with tracking_errors(f"reopen run {run_id}"):
            client.update_run(run_id, status="RUNNING")
            if TAG_ERROR in earlier.data.tags:
                client.delete_tag(run_id, TAG_ERROR)
        log.info("pipeline run %s continues in its MLflow parent run %s", ctx.pipeline_run_id, run_id)
        return run_id
    with tracking_errors("create a run"):
        run_id = client.create_run(experiment_id(client, ctx),
                                   run_name=run_name or f"pipeline-{ctx.pipeline_run_id}",
                                   tags=_base_tags(ctx, KIND_PIPELINE)).info.run_id
    if params:
        StageRun(client, run_id, "pipeline", ctx).log_params(params)
    return run_id


def close_orphaned_runs(pipeline_run_id: str, experiment: str, reason: str) -> list[str]:
    """End the runs of pipeline run ``pipeline_run_id`` that are still RUNNING although nothing runs
    them any more (its process died): its parent run, its stage runs and the runs nested in those
    (tagged ``<id>/...``) are marked KILLED with ``reason`` as their error. Returns their run ids."""
    client = mlflow_client()
    with tracking_errors(f"open experiment {experiment!r}"):
        found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    closed = []
    with tracking_errors(f"close the runs of pipeline run {pipeline_run_id}"):
        for match in (f"= '{pipeline_run_id}'", f"LIKE '{pipeline_run_id}/%'"):
            for run in client.search_runs([found.experiment_id], filter_string=(
                    f"tags.`{TAG_PIPELINE_RUN}` {match} and attributes.status = 'RUNNING'")):
                _log_batch(client, run.info.run_id, "tag", tags={TAG_ERROR: reason[:_MAX_ERROR_CHARS]})
                client.set_terminated(run.info.run_id, "KILLED")
                closed.append(run.info.run_id)
    if closed:
        log.info("marked %d MLflow run(s) of pipeline run %s KILLED: %s", len(closed), pipeline_run_id,
                 reason)
    return closed


def record_pipeline_results(parent_run_id: str, *, artifacts: Mapping[str, str], metrics: Mapping[str, float],
                            model_version: str, promoted: bool) -> None:
    """Put a pipeline run's outcome on its parent run: every artifact's URI (tag
    ``artifact.<stage>/<artifact>``), the eval metrics, the model version and whether it was
    promoted (``find_pipeline_run`` reads them back)."""
    tags = {**{f"{TAG_ARTIFACT_PREFIX}{name}": uri for name, uri in artifacts.items()},
            TAG_MODEL_VERSION: model_version, TAG_PROMOTED: str(promoted)}
    _log_batch(mlflow_client(), parent_run_id, "record results on", metrics=metrics, tags=tags)


def end_pipeline_run(run_id: str, status: str = "FINISHED", *, error: str | None = None) -> None:
    """Close a parent run: FINISHED, FAILED or KILLED (the pipeline's exit handler decides), with
    the error (e.g. the failed task's message) tagged when given."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise TrackingError(f"end_pipeline_run: status {status!r} is not FINISHED, FAILED or KILLED")
    client = mlflow_client()
    if error:
        _log_batch(client, run_id, "tag", tags={TAG_ERROR: error[:_MAX_ERROR_CHARS]})
    with tracking_errors(f"end run {run_id}"):
        client.set_terminated(run_id, status)


@contextlib.contextmanager
def pipeline_run(ctx: RunContext, params: Mapping[str, object] | None = None) -> Iterator[RunContext]:
    """A parent run around in-process stages: yields ctx with parent_run_id set."""
    run_id = start_pipeline_run(ctx, params)
    status = "FAILED"
    try:
        yield dataclasses.replace(ctx, parent_run_id=run_id)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        end_pipeline_run(run_id, status)
