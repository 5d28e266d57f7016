"""S3: the boto3 client built from the settings, boto errors as one-line StorageErrors, and calls
and transfers that ride out an outage of the endpoint.

Works with AWS S3, MinIO and SeaweedFS (path-style addressing whenever an endpoint is set). With
neither keys nor a session token in the settings, boto3's default chain (IAM role, ~/.aws) applies.

Retries, two layers:

- botocore retries each request (``AWS_RETRY_MODE``, default standard; ``AWS_MAX_ATTEMPTS``,
  default 10). Its retry quota is shared by the client, and a few parallel transfers use it up
  within seconds of an outage (a restarted store, a rescheduled pod);
- ``OutageWindow``, the one retry policy above it: every call of a transfer (the first and the last
  included) and every single-object call is tried again, after 1, 2, 4 ... 15 s, while the endpoint
  is unreachable or answers 5xx, until it has been so for ``GPT2OPS_S3_OUTAGE_S`` seconds (default
  120, the last try at the end). Then a StorageError names the URI, the endpoint and that setting.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from gpt2core.errors import StorageError, one_line
from gpt2core.platform.artifacts.uris import s3_key, split_s3_uri
from gpt2core.platform.settings import SECRET_DIR_ENV, OUTAGE_ENV, Settings, setting_source, settings

log = logging.getLogger(__name__)

T = TypeVar("T")
_MB = 1 << 20
_PROGRESS_EVERY_S = 10.0
_FIRST_PAUSE_S, _MAX_PAUSE_S = 1.0, 15.0
# Parallel transfers: files go concurrently, large files in 64 MB multipart chunks.
MAX_CONCURRENCY = 10
MULTIPART_BYTES = 64 * _MB


# --------------------------------------------------------------------------------------------------
# Client


def endpoint() -> str:
    """The S3 endpoint for messages: its URL, or ``AWS S3``."""
    return settings().aws_endpoint_url or "AWS S3"


def endpoint_source() -> str:
    """What chose the S3 endpoint, for the end of a message: ``(endpoint from AWS_ENDPOINT_URL)``."""
    return f"(endpoint from {setting_source('aws_endpoint_url')})"


def s3_configured() -> bool:
    """Whether an S3 endpoint or credentials are configured (else `embedded_s3` can provide one)."""
    s = settings()
    return bool(s.aws_endpoint_url or s.aws_access_key_id)


def export_s3_env() -> None:
    """Copy S3 settings read from the secret folder into this process's environment, for libraries
    that only read the environment (MLflow's S3 artifact store, child processes)."""
    s = settings()
    values = {"AWS_ACCESS_KEY_ID": s.aws_access_key_id,
              "AWS_SECRET_ACCESS_KEY": _revealed(s.aws_secret_access_key),
              "AWS_SESSION_TOKEN": _revealed(s.aws_session_token),
              "AWS_ENDPOINT_URL_S3": s.aws_endpoint_url, "MLFLOW_S3_ENDPOINT_URL": s.aws_endpoint_url}
    for key, value in values.items():
        if value and not os.environ.get(key):
            os.environ[key] = value


def _revealed(secret) -> str | None:  # noqa: ANN001 - a SecretStr or None
    return None if secret is None else secret.get_secret_value()


@functools.lru_cache(maxsize=8)
def _client_for(s: Settings):  # noqa: ANN202 - a botocore S3 client
    import boto3
    import botocore.config

    config = botocore.config.Config(
        retries={"mode": s.aws_retry_mode, "total_max_attempts": s.aws_max_attempts},
        connect_timeout=10, read_timeout=120, max_pool_connections=MAX_CONCURRENCY + 4,
        # MinIO / SeaweedFS / most self-hosted stores serve buckets as paths, not subdomains.
        s3={"addressing_style": "path" if s.aws_endpoint_url else "auto"},
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=s.aws_endpoint_url, region_name=s.aws_region,
        aws_access_key_id=s.aws_access_key_id, aws_secret_access_key=_revealed(s.aws_secret_access_key),
        aws_session_token=_revealed(s.aws_session_token), config=config)


def s3_client():  # noqa: ANN201 - a botocore S3 client
    """A boto3 S3 client for the current settings (one per distinct settings, cached)."""
    return _client_for(settings())


# --------------------------------------------------------------------------------------------------
# Errors


_ACCESS_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                 "InvalidToken", "ExpiredToken", "Forbidden"}


@contextlib.contextmanager
def s3_errors(uri: str, action: str) -> Iterator[None]:
    """Turn boto errors into a StorageError naming the URI and the endpoint, never a credential:
    ``s3://b/k: could not upload at http://host:8333: <what the store said>``."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    where = endpoint()
    try:
        yield
    except NoCredentialsError:
        raise StorageError(f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and "
                           f"AWS_SECRET_ACCESS_KEY or mount them in ${SECRET_DIR_ENV}") from None
    except (ClientError, S3UploadFailedError) as exc:
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            detail = exc.response.get("Error", {}).get("Message", "") or code
        else:  # the upload wrapper keeps only the text of the underlying ClientError
            text = str(exc)
            code = next((c for c in (*_ACCESS_CODES, "NoSuchBucket") if c in text), "")
            detail = text
        if code == "NoSuchBucket":
            raise StorageError(f"{uri}: bucket {split_s3_uri(uri)[0]!r} does not exist at {where} "
                               f"{endpoint_source()}") from None
        if code in _ACCESS_CODES:
            raise StorageError(f"{uri}: {where} refused to {action} ({code}); check the S3 "
                               f"credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) {endpoint_source()}") from None
        raise StorageError(f"{uri}: could not {action} at {where}: {one_line(detail)} {endpoint_source()}") from None
    except BotoCoreError as exc:  # connection refused, timeouts after all retries, ...
        raise StorageError(f"{uri}: could not {action} at {where}: {one_line(exc)} {endpoint_source()}") from None


def is_missing(exc: Exception) -> bool:
    """Whether exc is S3's answer for a key that does not exist."""
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in (
        "404", "NoSuchKey", "NotFound")


@functools.cache
def _retried_types() -> tuple[type[Exception], ...]:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from s3transfer.exceptions import RetriesExceededError

    return BotoConnectionError, HTTPClientError, ClientError, S3UploadFailedError, RetriesExceededError


def _is_transient(exc: Exception) -> bool:
    """Connection trouble or a server-side (5xx) error: worth trying again once the store is back."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
    if isinstance(exc, S3UploadFailedError):  # keeps only the text of the ClientError it wraps
        return any(code in str(exc) for code in ("InternalError", "ServiceUnavailable", "SlowDown",
                                                 "(500)", "(502)", "(503)", "(504)"))
    return True


# --------------------------------------------------------------------------------------------------
# The retry policy


class OutageWindow:
    """Rides out one outage of the S3 endpoint for the calls of one operation (a transfer shares
    one window across all its calls). An outage starts with the first failing call after the last
    one that succeeded (or the last byte moved) and may last ``GPT2OPS_S3_OUTAGE_S`` seconds; calls
    are tried again after 1, 2, 4 ... 15 s. Errors that no retry fixes (403, 404, a missing bucket)
    are raised at once, for ``s3_errors`` to word."""

    def __init__(self, uri: str, action: str):
        self.uri, self.action = uri, action
        self.limit_s = settings().s3_outage_s
        self._since: float | None = None
        self._pause_s = _FIRST_PAUSE_S

    def call(self, request: Callable[[], T]) -> T:
        """request() (one S3 call, or a paginated listing as a whole) until it succeeds."""
        while True:
            started = time.monotonic()
            try:
                result = request()
            except _retried_types() as exc:
                if not _is_transient(exc):
                    raise
                self.wait(exc, since=started)
                continue
            self.recovered()
            return result

    def recovered(self) -> None:
        """The endpoint answered: a later failure starts a new outage."""
        self._since, self._pause_s = None, _FIRST_PAUSE_S

    def wait(self, error: Exception, *, since: float) -> None:
        """Sleep before the next try (the last one at the end of the window); StorageError once the
        window is over. since: when the failed attempt started (or its last byte moved), the
        outage's start if it is the first failure."""
        if self._since is None:
            self._since = since
        down_s = time.monotonic() - self._since
        if down_s >= self.limit_s:
            detail = (str(error).splitlines() or [type(error).__name__])[0][:300]
            raise StorageError(
                f"{self.uri}: could not {self.action} at {endpoint()}: S3 unreachable or failing for "
                f"{down_s:.0f} s, past the outage window {OUTAGE_ENV}={self.limit_s:g} s ({detail}) "
                f"{endpoint_source()}")
        pause_s = min(self._pause_s, self.limit_s - down_s)
        log.warning("%s: S3 endpoint %s unreachable or failing for %.0f s (%s); trying again in %.0f s",
                    self.uri, endpoint(), down_s, error, pause_s)
        time.sleep(pause_s)
        self._pause_s = min(2 * self._pause_s, _MAX_PAUSE_S)


# --------------------------------------------------------------------------------------------------
# Listing and transfers


def list_keys(bucket: str, prefix: str, window: OutageWindow | None = None) -> list[str]:
    """Every key starting with prefix (all pages), riding out an outage."""
    def request() -> list[str]:
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    return (window or OutageWindow(f"s3://{bucket}/{prefix}", "list")).call(request)


class Progress:
    """Bytes moved and throughput, logged every few seconds (an s3transfer subscriber); also when a
    byte last moved, which is when an outage in the middle of a transfer began at the latest."""

    def __init__(self, verb: str, uri: str, total_bytes: int | None):
        from s3transfer.subscribers import BaseSubscriber

        self.verb, self.uri, self.total = verb, uri, total_bytes
        self.done, self.start = 0, time.monotonic()
        self.last_moved = self._last_log = self.start
        self._lock = threading.Lock()
        progress = self

        class Subscriber(BaseSubscriber):
            def on_progress(self, future, bytes_transferred, **kwargs):  # noqa: ANN001, ANN003
                progress.add(bytes_transferred)

        self.subscriber = Subscriber()

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            self.last_moved = now = time.monotonic()
            if now - self._last_log >= _PROGRESS_EVERY_S:
                self._last_log = now
                self.log()

    def log(self) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-6)
        of_total = "" if self.total is None else f" / {self.total / _MB:.1f}"
        log.info("%s %s: %.1f%s MB (%.1f MB/s)", self.verb, self.uri, self.done / _MB, of_total,
                 self.done / _MB / elapsed)


def _transfer_manager():  # noqa: ANN202 - an s3transfer TransferManager
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    config = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES,
                            max_concurrency=MAX_CONCURRENCY, preferred_transfer_client="classic")
    return create_transfer_manager(s3_client(), config)


Submit = Callable[[Any, list], Any]  # (TransferManager, subscribers) -> s3transfer future


def transfer(jobs: Mapping[str, Submit], window: OutageWindow, progress: Progress,
             on_done: Callable[[str], None] | None = None) -> None:
    """Run every job in parallel (name -> submit); the ones that fail because the endpoint is
    unreachable or failing run again, whole, within the outage window. on_done(name) as each
    job completes, in the order of jobs."""
    pending = list(jobs)
    while pending:
        started = time.monotonic()
        failed, error = [], None
        with _transfer_manager() as manager:
            futures = [(name, jobs[name](manager, [progress.subscriber])) for name in pending]
            for name, future in futures:
                try:
                    future.result()
                except _retried_types() as exc:
                    if not _is_transient(exc):
                        raise
                    failed.append(name)
                    error = exc
                    continue
                if on_done:
                    on_done(name)
        if len(failed) < len(pending):
            window.recovered()
        if failed:
            window.wait(error, since=max(started, progress.last_moved))
        pending = failed


def upload_files(uri: str, folder: Path, paths: Sequence[str], window: OutageWindow, *,
                 total_bytes: int, on_file_done: Callable[[str], None] | None = None) -> None:
    """folder/path -> uri/path for every (POSIX, relative) path; progress logged."""
    bucket, prefix = split_s3_uri(uri)
    progress = Progress("uploading to", uri, total_bytes)
    transfer({path: functools.partial(_upload, str(folder / path), bucket, s3_key(prefix, path))
              for path in paths}, window, progress, on_file_done)
    progress.log()


def download_files(uri: str, paths: Sequence[str], folder: Path, window: OutageWindow | None = None,
                   *, total_bytes: int | None = None) -> None:
    """uri/path -> folder/path for every (POSIX, relative) path; folders made; progress logged."""
    bucket, prefix = split_s3_uri(uri)
    for path in paths:
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
    progress = Progress("downloading", uri, total_bytes)
    transfer({path: functools.partial(_download, bucket, s3_key(prefix, path), str(folder / path))
              for path in paths}, window or OutageWindow(uri, "download"), progress)
    progress.log()


def upload_file(local: Path, uri: str, window: OutageWindow) -> None:
    """One local file to the object at uri (multipart when large)."""
    bucket, key = split_s3_uri(uri)
    transfer({key: functools.partial(_upload, str(local), bucket, key)}, window,
             Progress("uploading to", uri, Path(local).stat().st_size))


def _upload(local: str, bucket: str, key: str, manager, subscribers: list):  # noqa: ANN001, ANN202
    return manager.upload(local, bucket, key, subscribers=subscribers)


def _download(bucket: str, key: str, local: str, manager, subscribers: list):  # noqa: ANN001, ANN202
    return manager.download(bucket, key, local, subscribers=subscribers)
