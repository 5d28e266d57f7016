"""The MLflow connection: the tracking URI from the settings, a client checked once per process,
MLflow failures as TrackingErrors naming the URI (credentials in it redacted)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from gpt2core.errors import TrackingError, one_line
from gpt2core.platform.context import RunContext
from gpt2core.platform.settings import setting_source, settings
from gpt2core.platform.tracking.tags import EXPERIMENT_KIND_TRAINING, MLFLOW_EXPERIMENT_KIND


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory."""
    return settings().mlflow_tracking_uri


def tracking_uri_source() -> str:
    """What chose the tracking URI, for messages: ``MLFLOW_TRACKING_URI`` or the default."""
    return setting_source("mlflow_tracking_uri")


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
                            f"{one_line(detail, 500)} (tracking URI from {tracking_uri_source()})") from exc


_checked_uris: set[str] = set()


def mlflow_client():  # noqa: ANN201 - an MlflowClient
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
        _seed_sqlite_store(uri, mlflow.__version__)
        if uri.startswith(("http://", "https://")):
            import requests

            try:
                # Any HTTP answer means reachable; a refused login shows in the call below.
                requests.get(uri.rstrip("/") + "/health", timeout=10)
            except requests.RequestException as exc:
                raise TrackingError(f"MLflow tracking server {redacted(uri)} is unreachable "
                                    f"({type(exc).__name__}; tracking URI from {tracking_uri_source()}); "
                                    f"start it or set MLFLOW_TRACKING_URI") from None
        with tracking_errors("open the tracking store"):
            MlflowClient(uri).search_experiments(max_results=1)
        _checked_uris.add(uri)
    return MlflowClient(uri)


def _seed_sqlite_store(uri: str, version: str) -> None:
    """A new sqlite store (``sqlite:///path`` that does not exist yet) starts as a copy of an empty one
    made once per MLflow version in the cache folder: MLflow would otherwise build it by running its
    schema migrations one by one, seconds of every first command. The copy is the same database."""
    if not uri.startswith("sqlite:///"):
        return
    target = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    if target.exists() or str(target) in ("", ":memory:"):
        return
    from mlflow.tracking import MlflowClient

    template = settings().cache_dir / "mlflow" / f"empty-store-{version}.db"
    try:
        if not template.exists():
            template.parent.mkdir(parents=True, exist_ok=True)
            building = template.with_name(f"{template.name}.{uuid.uuid4().hex[:8]}.tmp")
            MlflowClient(f"sqlite:///{building}").search_experiments(max_results=1)
            os.replace(building, template)
        target.parent.mkdir(parents=True, exist_ok=True)
        copy = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        shutil.copyfile(template, copy)
        try:
            os.link(copy, target)  # never over a store another process created meanwhile
        except FileExistsError:
            pass
        finally:
            copy.unlink()
    except OSError:
        pass  # MLflow creates the store itself


def experiment_id(client, ctx: RunContext) -> str:  # noqa: ANN001 - an MlflowClient
    """The id of ctx.experiment; a new experiment keeps its artifacts under the pipeline's
    artifact root (``<root>/mlflow``), so with an s3:// root they go to the same S3 as the stages'.
    The experiment is marked as model training (``mlflow.experimentKind``; see ``tags``); an
    experiment already marked otherwise keeps its mark."""
    with tracking_errors(f"open experiment {ctx.experiment!r}"):
        experiment = client.get_experiment_by_name(ctx.experiment)
        if experiment is None:
            location = f"{ctx.artifact_root.rstrip('/')}/mlflow"
            return client.create_experiment(ctx.experiment, artifact_location=location,
                                            tags={MLFLOW_EXPERIMENT_KIND: EXPERIMENT_KIND_TRAINING})
        if MLFLOW_EXPERIMENT_KIND not in experiment.tags:  # made before gpt2ops marked its experiments
            client.set_experiment_tag(experiment.experiment_id, MLFLOW_EXPERIMENT_KIND,
                                      EXPERIMENT_KIND_TRAINING)
        return experiment.experiment_id


def git_sha() -> str:
    """The code version: $GPT2OPS_GIT_SHA (set when an image is built), else the checkout's HEAD."""
    if settings().git_sha:
        return settings().git_sha
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
