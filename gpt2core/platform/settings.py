"""Settings: every environment variable gpt2ops reads, read once per process into one typed object.

    from gpt2core.platform.settings import settings
    settings().s3_outage_s        # GPT2OPS_S3_OUTAGE_S, a float >= 0, default 120

Sources, first found wins: the environment (an empty variable counts as unset), then a file named
like the variable in the secret folder ``$GPT2OPS_S3_SECRET_DIR`` (default
``/var/run/secrets/gpt2ops/s3``: a Kubernetes Secret mounted as files; a trailing newline is
stripped), then the default. pydantic-settings reads both (``secrets_dir``). A field is named after
its variable, lowercased, without ``GPT2OPS_``; ``Settings.variables()`` maps fields to variables.

``settings()`` reads once and caches. A process that changes its own environment afterwards (the
embedded S3 server exporting ``AWS_*``, ``gpt2ops run`` pointing MLflow at its work folder, tests)
calls ``reload_settings()``; the next ``settings()`` reads again. Variables of other programs
(torchrun's ``RANK``, ``KUBECONFIG``, ``HF_ENDPOINT``, ``DOCKER_HOST``) are not settings.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gpt2core.errors import SettingsError

SECRET_DIR_ENV = "GPT2OPS_S3_SECRET_DIR"
OUTAGE_ENV = "GPT2OPS_S3_OUTAGE_S"
DEFAULT_SECRET_DIR = Path("/var/run/secrets/gpt2ops/s3")


def _env(*names: str) -> str | AliasChoices:
    return names[0] if len(names) == 1 else AliasChoices(*names)


class Settings(BaseSettings):
    """Every setting of this process. Frozen (so hashable: an S3 client is cached per settings);
    secrets are ``SecretStr`` and the access key id is left out of ``repr``, so none reaches a log.
    Each field's description says what a valid value is; ``SettingsError`` quotes it."""

    model_config = SettingsConfigDict(case_sensitive=True, env_ignore_empty=True, frozen=True,
                                      extra="ignore")

    # ---- S3 (artifacts; MLflow's artifact store gets the same through export_s3_env)
    aws_endpoint_url: str | None = Field(
        None, validation_alias=_env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"), pattern=r"^https?://[^/\s]+",
        description="the S3 endpoint URL with its scheme, e.g. http://minio:9000 (unset: AWS S3)")
    aws_access_key_id: str | None = Field(None, validation_alias=_env("AWS_ACCESS_KEY_ID"), repr=False,
                                          description="an S3 access key id")
    aws_secret_access_key: SecretStr | None = Field(
        None, validation_alias=_env("AWS_SECRET_ACCESS_KEY"), description="an S3 secret access key")
    aws_session_token: SecretStr | None = Field(
        None, validation_alias=_env("AWS_SESSION_TOKEN"), description="an S3 session token")
    aws_region: str = Field("us-east-1", validation_alias=_env("AWS_REGION", "AWS_DEFAULT_REGION"),
                            description="an AWS region name")
    aws_retry_mode: Literal["legacy", "standard", "adaptive"] = Field(
        "standard", validation_alias=_env("AWS_RETRY_MODE"),
        description="legacy, standard or adaptive (botocore's retry mode)")
    aws_max_attempts: int = Field(10, ge=1, validation_alias=_env("AWS_MAX_ATTEMPTS"),
                                  description="a positive integer (botocore's attempts per request)")
    s3_secret_dir: Path = Field(DEFAULT_SECRET_DIR, validation_alias=_env(SECRET_DIR_ENV),
                                description="a folder holding settings as files (a mounted Secret)")
    s3_outage_s: float = Field(
        120.0, ge=0, validation_alias=_env(OUTAGE_ENV),
        description="a number of seconds >= 0 (how long S3 calls ride out an unreachable or failing "
                    "endpoint)")

    # ---- local folders
    scratch_dir: Path | None = Field(
        None, validation_alias=_env("GPT2OPS_SCRATCH_DIR"),
        description="a folder for downloads and staging (unset: the system temp folder)")
    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "gpt2ops",
                            validation_alias=_env("GPT2OPS_CACHE_DIR"),
                            description="a folder keeping downloads and tokenized corpora between runs")
    config_dir: Path | None = Field(
        None, validation_alias=_env("GPT2OPS_CONFIG_DIR"),
        description="the folder of the bundled configs (unset: configs/ of the checkout)")

    # ---- the run a stage belongs to (the CLI's --pipeline_run_id etc. override them)
    pipeline_run_id: str | None = Field(None, validation_alias=_env("GPT2OPS_PIPELINE_RUN_ID"),
                                        description="the pipeline run id (unset: a new one)")
    artifact_root: str | None = Field(
        None, validation_alias=_env("GPT2OPS_ARTIFACT_ROOT"),
        description="a local folder or s3://bucket/prefix (unset: ./work/artifacts)")
    mlflow_parent_run_id: str | None = Field(None, validation_alias=_env("GPT2OPS_MLFLOW_PARENT_RUN_ID"),
                                             description="the MLflow run id of the pipeline run")

    # ---- tracking
    mlflow_tracking_uri: str = Field(
        "sqlite:///mlflow.db", validation_alias=_env("MLFLOW_TRACKING_URI"),
        pattern=r"^([A-Za-z][A-Za-z0-9+.-]*://|databricks)",
        description="an MLflow tracking URI with its scheme, e.g. sqlite:///mlflow.db, http://mlflow:5000 or "
                    "postgresql://host/db")
    mlflow_experiment_name: str = Field("gpt2ops", validation_alias=_env("MLFLOW_EXPERIMENT_NAME"),
                                        description="an MLflow experiment name")
    git_sha: str | None = Field(None, validation_alias=_env("GPT2OPS_GIT_SHA"),
                                description="the code version (unset: the checkout's HEAD)")
    model_name: str | None = Field(None, validation_alias=_env("GPT2OPS_MODEL_NAME"),
                                   description="the registered model name (unset: <experiment>-gpt2)")

    # ---- targets, images and the cluster
    cerebras_python: Path | None = Field(
        None, validation_alias=_env("GPT2OPS_CEREBRAS_PYTHON"),
        description="the Python of the Cerebras SDK venv (unset: found)")
    cerebras_backend: str = Field("CSX", validation_alias=_env("GPT2OPS_CEREBRAS_BACKEND"),
                                  description="the Cerebras backend, CSX or CPU")
    trainer_image: str | None = Field(None, validation_alias=_env("GPT2OPS_TRAINER_IMAGE"),
                                      description="the image of the TrainJob nodes")
    namespace: str | None = Field(None, validation_alias=_env("GPT2OPS_NAMESPACE"),
                                  description="the Kubernetes namespace of TrainJobs")
    images_file: Path | None = Field(
        None, validation_alias=_env("GPT2OPS_IMAGES_FILE"),
        description="the image build record (unset: containers/images.json)")
    image_cpu: str | None = Field(None, validation_alias=_env("GPT2OPS_IMAGE_CPU"),
                                  description="the cpu image reference")
    image_cuda: str | None = Field(None, validation_alias=_env("GPT2OPS_IMAGE_CUDA"),
                                   description="the cuda image reference")
    image_cerebras: str | None = Field(None, validation_alias=_env("GPT2OPS_IMAGE_CEREBRAS"),
                                       description="the cerebras image reference")

    @field_validator("cerebras_backend")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    def image(self, target: str) -> str | None:
        """``GPT2OPS_IMAGE_<TARGET>``: the image set for an images target (cpu, cuda, cerebras)."""
        return getattr(self, f"image_{target}", None)

    @classmethod
    def variables(cls) -> dict[str, tuple[str, ...]]:
        """field name -> the variables it is read from, first found wins."""
        found = {}
        for name, field in cls.model_fields.items():
            alias = field.validation_alias
            found[name] = tuple(alias.choices) if isinstance(alias, AliasChoices) else (alias,)
        return found


_NOT_SHOWN = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


def _read() -> Settings:
    try:
        folder = Settings().s3_secret_dir  # where the secret folder is: the environment alone says
        return Settings(_secrets_dir=folder) if folder.is_dir() else Settings()
    except ValidationError as exc:
        raise SettingsError(_one_line(exc)) from None


def _one_line(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        variable = str(error["loc"][0]) if error["loc"] else "?"
        names = next((names for names in Settings.variables().values() if variable in names), ())
        field = next((f for name, f in Settings.model_fields.items() if Settings.variables()[name] == names), None)
        variable = next((name for name in names if os.environ.get(name)), variable)  # the one that was set
        shown = "<hidden>" if variable in _NOT_SHOWN else repr(error.get("input"))
        expected = field.description if field is not None else error["msg"]
        problems.append(f"{variable}={shown}: expected {expected}")
    return "; ".join(problems)


def setting_source(field: str) -> str:
    """Where this process's value of setting ``field`` comes from, for messages about an endpoint
    that failed: the variable that set it (``AWS_ENDPOINT_URL_S3``), the file of the secret folder,
    or ``the default (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL unset)``."""
    names = Settings.variables()[field]
    for name in names:
        if os.environ.get(name):
            return name
    folder = settings().s3_secret_dir
    for name in names:
        if (folder / name).is_file():
            return f"{name} in {folder}"
    return f"the default ({', '.join(names)} unset)"


@functools.cache
def settings() -> Settings:
    """This process's settings, read on first use. Raises SettingsError naming the variable and
    what was expected when one has a bad value (``AWS_MAX_ATTEMPTS=abc``)."""
    return _read()


def reload_settings() -> None:
    """Forget the settings read so far: the next ``settings()`` reads the environment and the secret
    folder again. Call it after this process changed its own environment."""
    settings.cache_clear()


@contextlib.contextmanager
def exported(variables: Mapping[str, str]) -> Iterator[None]:
    """Set variables in this process's environment (so its child processes get them too) and re-read
    the settings for the block; the previous values (and settings) are back afterwards."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    reload_settings()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        reload_settings()
