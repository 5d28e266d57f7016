"""Artifact storage behind one interface for local paths and s3:// URIs.

An artifact is a directory of files plus a ``MANIFEST.json`` (path, bytes, sha256 of every file)
written LAST: an artifact whose manifest is missing does not exist, and readers verify checksums.

- ``local_input(uri)``: a local Path holding the artifact (downloaded and verified for s3://);
- ``shared_local_input(uri)``: the same, downloaded once per machine for all its processes;
- ``local_output(uri)``: an empty staging Path to write into; published on clean exit with the
  manifest last, nothing published on error;
- ``upload_dir`` / ``download_dir`` / ``read_manifest`` / ``artifact_exists``; ``read_text`` /
  ``fetch_file`` for single objects (configs, tokenizer files) so any file input may be s3:// too.

S3 works with AWS S3, MinIO and SeaweedFS. Settings come from the environment or a mounted secret
folder, never from parameters: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (path-style addressing
when set), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, region from
``AWS_REGION`` / ``AWS_DEFAULT_REGION``. Any of them missing from the environment is read from a
file of the same name in ``$GPT2OPS_S3_SECRET_DIR`` (default ``/var/run/secrets/gpt2ops/s3``, a
Kubernetes secret mounted as a volume); with no keys at all, boto3's default chain (IAM role,
~/.aws) applies. Transient failures are retried by botocore (``AWS_RETRY_MODE``, default standard;
``AWS_MAX_ATTEMPTS``, default 10), and whole files again while the endpoint is unreachable, for up
to ``GPT2OPS_S3_OUTAGE_S`` seconds (default 120).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from gpt2core.errors import StorageError

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
SECRET_DIR_ENV = "GPT2OPS_S3_SECRET_DIR"
DEFAULT_SECRET_DIR = "/var/run/secrets/gpt2ops/s3"
_MB = 1 << 20
_PROGRESS_EVERY_S = 10.0
# Parallel transfers: files go concurrently, large files in 64 MB multipart chunks.
_MAX_CONCURRENCY = 10
_MULTIPART_BYTES = 64 * _MB


# --------------------------------------------------------------------------------------------------
# URIs and manifests


class NotFound(StorageError):
    """The object or artifact does not exist (an artifact without its manifest does not)."""


def is_s3(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")`` (no trailing slash)."""
    bucket, _, key = str(uri)[len("s3://"):].partition("/")
    if not is_s3(uri) or not bucket:
        raise StorageError(f"{uri}: not an S3 URI (expected s3://bucket/key)")
    return bucket, key.strip("/")


def _local_path(uri: str | Path) -> Path:
    uri = str(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported URI scheme (expected a local path or s3://bucket/key)")
    return Path(uri)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_MB), b""):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(folder: Path) -> dict:
    """Files (path, bytes, sha256) under folder, sorted; hashed in threads (hashlib frees the GIL)."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(sha256_file, paths))
    files = [{"path": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size, "sha256": d}
             for p, d in zip(paths, digests)]
    return {"files": files, "total_bytes": sum(f["bytes"] for f in files)}


def manifest_digest(manifest: dict) -> str:
    """A content hash of an artifact (e.g. the dataset hash tagged on MLflow runs): the sha256 of
    its files' paths and checksums, so the same bytes give the same hash wherever they are stored."""
    listing = "\n".join(f"{f['path']} {f['sha256']}" for f in manifest["files"])
    return hashlib.sha256(listing.encode()).hexdigest()


def _verify_files(folder: Path, manifest: dict, uri: str, *, checksums: bool) -> None:
    for entry in manifest["files"]:
        path = folder / entry["path"]
        if not path.is_file():
            raise StorageError(f"{uri}: file {entry['path']} listed in {MANIFEST} is missing")
        if path.stat().st_size != entry["bytes"]:
            raise StorageError(f"{uri}: file {entry['path']} has {path.stat().st_size} bytes, "
                               f"{MANIFEST} says {entry['bytes']}")
        if checksums and sha256_file(path) != entry["sha256"]:
            raise StorageError(f"{uri}: file {entry['path']} does not match its sha256 in {MANIFEST} "
                               "(corrupted in storage or in transfer)")


# --------------------------------------------------------------------------------------------------
# S3 client


@dataclass(frozen=True)
class S3Settings:
    """Where and as whom to talk S3. Secrets are excluded from repr so they never reach a log."""

    endpoint_url: str | None
    region: str
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    retry_mode: str = "standard"
    max_attempts: int = 10

    @classmethod
    def from_env(cls) -> S3Settings:
        secret_dir = Path(os.environ.get(SECRET_DIR_ENV, DEFAULT_SECRET_DIR))

        def get(*names: str) -> str | None:
            for name in names:
                if os.environ.get(name):
                    return os.environ[name]
            for name in names:
                path = secret_dir / name
                if path.is_file():
                    return path.read_text().strip() or None
            return None

        max_attempts = get("AWS_MAX_ATTEMPTS") or "10"
        if not max_attempts.isdigit() or int(max_attempts) < 1:
            raise StorageError(f"AWS_MAX_ATTEMPTS={max_attempts!r}: expected a positive integer")
        return cls(
            endpoint_url=get("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
            region=get("AWS_REGION", "AWS_DEFAULT_REGION") or "us-east-1",
            access_key_id=get("AWS_ACCESS_KEY_ID"),
            secret_access_key=get("AWS_SECRET_ACCESS_KEY"),
            session_token=get("AWS_SESSION_TOKEN"),
            retry_mode=get("AWS_RETRY_MODE") or "standard",
            max_attempts=int(max_attempts),
        )

    @property
    def where(self) -> str:
        return self.endpoint_url or "AWS S3"


def s3_configured() -> bool:
    """Whether an S3 endpoint or credentials are configured (else `embedded_s3` can provide one)."""
    s = S3Settings.from_env()
    return bool(s.endpoint_url or s.access_key_id)


def export_s3_env() -> None:
    """Copy S3 settings read from a mounted secret into this process's environment, for libraries
    that only read the environment (MLflow's S3 artifact store, child processes)."""
    s = S3Settings.from_env()
    values = {"AWS_ACCESS_KEY_ID": s.access_key_id, "AWS_SECRET_ACCESS_KEY": s.secret_access_key,
              "AWS_SESSION_TOKEN": s.session_token, "AWS_ENDPOINT_URL_S3": s.endpoint_url,
              "MLFLOW_S3_ENDPOINT_URL": s.endpoint_url}
    for key, value in values.items():
        if value and not os.environ.get(key):
            os.environ[key] = value


@functools.lru_cache(maxsize=8)
def _client_for(settings: S3Settings):
    import boto3
    import botocore.config

    config = botocore.config.Config(
        retries={"mode": settings.retry_mode, "total_max_attempts": settings.max_attempts},
        connect_timeout=10, read_timeout=120, max_pool_connections=_MAX_CONCURRENCY + 4,
        # MinIO / SeaweedFS / most self-hosted stores serve buckets as paths, not subdomains.
        s3={"addressing_style": "path" if settings.endpoint_url else "auto"},
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=settings.endpoint_url, region_name=settings.region,
        aws_access_key_id=settings.access_key_id, aws_secret_access_key=settings.secret_access_key,
        aws_session_token=settings.session_token, config=config)


def s3_client():
    """A boto3 S3 client for the current settings (cached; settings are re-read on every call)."""
    return _client_for(S3Settings.from_env())


_ACCESS_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                 "InvalidToken", "ExpiredToken", "Forbidden"}


@contextlib.contextmanager
def _s3_errors(uri: str, action: str) -> Iterator[None]:
    """Turn boto errors into a StorageError naming the URI and the endpoint, never a credential."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    where = S3Settings.from_env().where
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
            raise StorageError(f"{uri}: bucket {split_s3_uri(uri)[0]!r} does not exist at {where}") from None
        if code in _ACCESS_CODES:
            raise StorageError(f"{uri}: {where} refused to {action} ({code}); check the S3 "
                               f"credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)") from None
        raise StorageError(f"{uri}: could not {action} at {where}: {detail}") from None
    except BotoCoreError as exc:  # connection refused, timeouts after all retries, ...
        raise StorageError(f"{uri}: could not {action} at {where}: {exc}") from None


def _is_missing(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in (
        "404", "NoSuchKey", "NotFound")


# --------------------------------------------------------------------------------------------------
# Transfers


class _Progress:
    """Logs bytes moved and throughput every few seconds (an s3transfer subscriber)."""

    def __init__(self, verb: str, uri: str, total_bytes: int):
        from s3transfer.subscribers import BaseSubscriber

        self.verb, self.uri, self.total = verb, uri, total_bytes
        self.done, self.start = 0, time.monotonic()
        self._last_log, self._lock = self.start, threading.Lock()
        progress = self

        class Subscriber(BaseSubscriber):
            def on_progress(self, future, bytes_transferred, **kwargs):
                progress.add(bytes_transferred)

        self.subscriber = Subscriber()

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._last_log >= _PROGRESS_EVERY_S:
                self._last_log = now
                self.log()

    def log(self) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-6)
        log.info("%s %s: %.1f / %.1f MB (%.1f MB/s)", self.verb, self.uri, self.done / _MB,
                 self.total / _MB, self.done / _MB / elapsed)


def _transfer_manager():
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    config = TransferConfig(multipart_threshold=_MULTIPART_BYTES, multipart_chunksize=_MULTIPART_BYTES,
                            max_concurrency=_MAX_CONCURRENCY, preferred_transfer_client="classic")
    return create_transfer_manager(s3_client(), config)


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


def _transfer_files(paths: list[str], submit: Callable, uri: str,
                    on_file_done: Callable[[str], None] | None = None) -> None:
    """Run submit(manager, path) for every path in parallel; files that fail because the endpoint
    is unreachable or failing (5xx) are tried again, whole, until $GPT2OPS_S3_OUTAGE_S (default 120) have passed.

    botocore retries each request, but its retry quota is shared by the client and a few parallel
    transfers use it up within seconds of an outage (a restarted store, a rescheduled pod).
    """
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    tolerance_s = float(os.environ.get("GPT2OPS_S3_OUTAGE_S", "120"))
    deadline, pause_s = time.monotonic() + tolerance_s, 1.0
    pending = list(paths)
    while pending:
        failed, error = [], None
        with _transfer_manager() as manager:
            futures = [(path, submit(manager, path)) for path in pending]
            for path, future in futures:
                try:
                    future.result()
                except (BotoConnectionError, HTTPClientError, ClientError, S3UploadFailedError) as exc:
                    if not _is_transient(exc):
                        raise
                    failed.append(path)
                    error = exc
                    continue
                if on_file_done:
                    on_file_done(path)
        if failed and time.monotonic() + pause_s > deadline:
            raise error
        if failed:
            log.warning("%s: S3 endpoint unreachable or failing (%s); retrying %d file(s) in %.0f s",
                        uri, error, len(failed), pause_s)
            time.sleep(pause_s)
            pause_s = min(2 * pause_s, 15.0)
        pending = failed


def _list_keys(bucket: str, prefix: str) -> list[str]:
    paginator = s3_client().get_paginator("list_objects_v2")
    return [obj["Key"] for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
            for obj in page.get("Contents", [])]


def upload_dir(local: str | Path, uri: str, *,
               on_file_done: Callable[[str], None] | None = None) -> dict:
    """Publish a local folder as the artifact at uri (s3:// or a local path); returns its manifest.

    Order makes a failure safe: the old manifest goes first (the old artifact stops existing), then
    the files, then leftovers of an older version are deleted, and the new manifest goes last.
    on_file_done(relative_path) is called as each file lands (progress hooks, fault tests).
    """
    local = Path(local)
    if not local.is_dir():
        raise StorageError(f"{local}: not a folder, nothing to upload to {uri}")
    manifest = build_manifest(local)
    manifest_bytes = json.dumps(manifest, indent=1).encode()
    if not is_s3(uri):
        dest = _local_path(uri)
        (dest / MANIFEST).unlink(missing_ok=True)
        for entry in manifest["files"]:
            (dest / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local / entry["path"], dest / entry["path"])
            if on_file_done:
                on_file_done(entry["path"])
        (dest / MANIFEST).write_bytes(manifest_bytes)
        return manifest

    bucket, prefix = split_s3_uri(uri)
    progress = _Progress("uploading to", uri, manifest["total_bytes"])
    with _s3_errors(uri, "upload"):
        s3_client().delete_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")
        stale = set(_list_keys(bucket, prefix + "/"))
        _transfer_files(
            [entry["path"] for entry in manifest["files"]],
            lambda manager, path: manager.upload(str(local / path), bucket, f"{prefix}/{path}",
                                                 subscribers=[progress.subscriber]),
            uri, on_file_done)
        stale -= {f"{prefix}/{entry['path']}" for entry in manifest["files"]}
        for key in sorted(stale):
            s3_client().delete_object(Bucket=bucket, Key=key)
        s3_client().put_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}", Body=manifest_bytes,
                               ContentType="application/json")
    progress.log()
    return manifest


def read_manifest(uri: str) -> dict:
    """The artifact's manifest; StorageError when it has none (it does not exist, or is partial)."""
    try:
        return json.loads(read_bytes(f"{str(uri).rstrip('/')}/{MANIFEST}"))
    except NotFound:
        raise NotFound(f"{uri}: no such artifact (no {MANIFEST}: never written, or its upload did "
                       "not finish)") from None
    except ValueError as exc:
        raise StorageError(f"{uri}/{MANIFEST}: not valid JSON ({exc})") from None


def artifact_exists(uri: str) -> bool:
    try:
        read_manifest(uri)
    except NotFound:
        return False
    return True


def find_artifact(uri: str, *, max_depth: int = 4) -> tuple[str, dict, str]:
    """(artifact URI, its manifest, uri's folder inside it): uri itself when it is an artifact, else
    the nearest enclosing one (a dataset's ``train/`` is inside the dataset artifact)."""
    uri = str(uri).rstrip("/")
    if is_s3(uri):
        bucket, key = split_s3_uri(uri)
        parts = key.split("/")
        candidates = [(f"s3://{bucket}/{'/'.join(parts[:d])}", "/".join(parts[d:]))
                      for d in range(len(parts), max(0, len(parts) - max_depth), -1)]
    else:
        path = _local_path(uri)
        candidates = [(str(path), "")] + [(str(parent), path.relative_to(parent).as_posix())
                                          for parent in list(path.parents)[:max_depth]]
    for artifact, sub in candidates:
        try:
            return artifact, read_manifest(artifact), sub
        except NotFound:
            continue
    raise NotFound(f"{uri}: no such artifact (no {MANIFEST} here or in the folders above: never "
                   "written, or its upload did not finish)")


def artifact_digest(uri: str) -> str | None:
    """manifest_digest of the artifact holding uri (the dataset hash of ``<dataset>/train``), or None
    when uri is in no artifact (a plain local folder; a missing one fails where it is read)."""
    try:
        return manifest_digest(find_artifact(uri)[1])
    except NotFound:
        return None


def _subfolder_manifest(uri: str, found: tuple[str, dict, str] | None = None) -> tuple[str, dict]:
    artifact, manifest, sub = found or find_artifact(uri)
    if not sub:
        return artifact, manifest
    files = [dict(f, path=f["path"][len(sub) + 1:]) for f in manifest["files"] if f["path"].startswith(sub + "/")]
    if not files:
        raise NotFound(f"{uri}: artifact {artifact} has no folder {sub}")
    return f"{artifact}/{sub}", {"files": files, "total_bytes": sum(f["bytes"] for f in files)}


def download_dir(uri: str, local: str | Path) -> dict:
    """Download the artifact at uri (or a folder inside one) into local (created), verifying every
    file's size and sha256 against the manifest; the manifest is copied too. Returns the manifest."""
    local = Path(local)
    if not is_s3(uri):
        manifest = read_manifest(uri)
        src = _local_path(uri)
        for entry in manifest["files"]:
            (local / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / entry["path"], local / entry["path"])
    else:
        uri, manifest = _subfolder_manifest(uri)
        bucket, prefix = split_s3_uri(uri)
        progress = _Progress("downloading", uri, manifest["total_bytes"])
        for entry in manifest["files"]:
            (local / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
        with _s3_errors(uri, "download"):
            _transfer_files(
                [entry["path"] for entry in manifest["files"]],
                lambda manager, path: manager.download(bucket, f"{prefix}/{path}", str(local / path),
                                                       subscribers=[progress.subscriber]),
                uri)
        progress.log()
    _verify_files(local, manifest, uri, checksums=True)
    (local / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


# --------------------------------------------------------------------------------------------------
# Stage I/O


def _scratch_root() -> str | None:
    """Where downloads and staging folders go ($GPT2OPS_SCRATCH_DIR, else the system temp dir)."""
    root = os.environ.get("GPT2OPS_SCRATCH_DIR")
    if root:
        Path(root).mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def local_input(uri: str) -> Iterator[Path]:
    """A local folder holding the artifact at uri, for the duration of the block.

    s3://: downloaded into a scratch folder (removed afterwards) and checksum-verified; no manifest
    means no artifact. uri may also be a folder inside an artifact (``<dataset>/train``). Local path: used in place; if it has a manifest (it was written by a stage)
    its files must be present with the listed sizes; a plain folder of user data is accepted as is.
    """
    if not is_s3(uri):
        path = _local_path(uri)
        if not path.is_dir():
            raise NotFound(f"{uri}: no such artifact (not a folder)")
        if (path / MANIFEST).is_file():
            _verify_files(path, read_manifest(str(path)), str(uri), checksums=False)
        yield path
        return
    scratch = Path(tempfile.mkdtemp(prefix="gpt2ops-in-", dir=_scratch_root()))
    try:
        download_dir(uri, scratch)
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _shared_slot(uri: str) -> tuple[Path, dict]:
    """(the node-wide folder for the s3:// uri, the manifest of its files): the folder is named by
    content (the artifact's manifest digest and uri's folder inside it), so a changed artifact
    never reuses an older copy."""
    found = find_artifact(uri)
    _artifact, manifest, sub = found
    key = hashlib.sha256(f"{manifest_digest(manifest)}\0{sub}".encode()).hexdigest()[:32]
    root = Path(_scratch_root() or tempfile.gettempdir()) / f"gpt2ops-shared-{os.getuid()}"
    root.mkdir(parents=True, exist_ok=True)
    return root / key, _subfolder_manifest(uri, found)[1]


@contextlib.contextmanager
def shared_local_input(uri: str) -> Iterator[Path]:
    """Like ``local_input``, but an s3:// artifact (or a folder inside one) is downloaded once per
    machine and shared by every process on it that asks for the same content (the N torchrun
    processes of a node), in ``<scratch>/gpt2ops-shared-<uid>/<key>/``, ``<key>`` from the
    artifact's manifest digest and the folder inside it. Local paths are used in place.

    Locking (``fcntl.flock``, on the local disk only, nothing shared across nodes), two lock files:

    - enter: LOCK_EX on ``<key>.lock`` (one entrant at a time), then LOCK_SH on ``<key>.users``,
      held for the whole block. If ``<key>/`` exists it is complete (renamed into place last) and
      is used; else any ``<key>.partial`` (a crashed downloader's) is removed, the files downloaded
      and verified into it, and it is renamed to ``<key>``. Then ``<key>.lock`` is released: the
      others wait on it only while a download runs;
    - exit: try LOCK_EX on ``<key>.users`` without blocking; only the last user gets it (everyone
      else still in a block, or downloading, holds LOCK_SH), and it removes ``<key>/``. An entrant
      meanwhile waits for its LOCK_SH until that removal is done, then finds no folder and
      downloads again. The two empty lock files stay (removing them would race with their users).
      A process killed in its block leaves the folder behind (its lock goes with it): the next
      user of the same content reuses it and cleans up.

    Within one process a second block on the same folder (eval data = train data) shares the first
    one's hold: a second flock would wait on the process's own LOCK_SH.
    """
    if not is_s3(uri):
        with local_input(uri) as path:
            yield path
        return
    folder, expected = _shared_slot(uri)
    with _held_lock:
        if folder in _held:  # this process holds it already (eval data = train data): flock on a
            _held[folder][1] += 1  # second descriptor would wait on our own LOCK_SH forever
            reused = True
        else:
            _held[folder] = [_acquire_shared(uri, folder, expected), 1]
            reused = False
    if reused:
        log.info("using %s, held already by this process, from %s", uri, folder)
    try:
        yield folder
    finally:
        with _held_lock:
            _held[folder][1] -= 1
            if _held[folder][1] == 0:
                _release_shared(_held.pop(folder)[0], folder)


_held: dict[Path, list] = {}  # shared folder -> [lock fd, users in this process]
_held_lock = threading.Lock()


def _acquire_shared(uri: str, folder: Path, expected: dict) -> int:
    """Make folder hold uri's files (downloading them unless they are there) and return the
    ``<key>.users`` descriptor, holding LOCK_SH; see ``shared_local_input``."""
    import fcntl

    entry = os.open(folder.with_name(folder.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(entry, fcntl.LOCK_EX)
        users = os.open(folder.with_name(folder.name + ".users"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(users, fcntl.LOCK_SH)  # waits while the last user out removes the folder
            if folder.is_dir():
                log.info("using %s, downloaded already on this node, from %s", uri, folder)
                return users
            partial = folder.with_name(folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)  # a crashed downloader's
            nprocs = os.environ.get("LOCAL_WORLD_SIZE")
            log.info("downloading %s once for the %sprocesses of this node into %s", uri,
                     f"{nprocs} " if nprocs else "", folder)
            got = download_dir(uri, partial)
            if got["files"] != expected["files"]:
                shutil.rmtree(partial, ignore_errors=True)
                raise StorageError(f"{uri}: the artifact changed during the download; retry")
            os.replace(partial, folder)
            return users
        except BaseException:
            os.close(users)
            raise
    finally:
        os.close(entry)


def _release_shared(users: int, folder: Path) -> None:
    """Drop this process's LOCK_SH; the last user (the one that gets LOCK_EX) removes the folder."""
    import fcntl

    try:
        fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pass  # others still use it; the last one out removes it
    else:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(folder.with_name(folder.name + ".partial"), ignore_errors=True)
    finally:
        os.close(users)


@contextlib.contextmanager
def local_output(uri: str) -> Iterator[Path]:
    """An empty folder to write the artifact into; published to uri (manifest last) when the block
    exits cleanly. On error nothing is published and an older artifact at uri is left untouched."""
    if is_s3(uri):
        split_s3_uri(uri)  # fail on a malformed URI before the stage does its work
        staging = Path(tempfile.mkdtemp(prefix="gpt2ops-out-", dir=_scratch_root()))
        try:
            yield staging
            upload_dir(staging, uri)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    dest = _local_path(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Staging beside the destination, so publishing is one atomic rename on the same filesystem.
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.staging-", dir=dest.parent))
    try:
        yield staging
        (staging / MANIFEST).write_text(json.dumps(build_manifest(staging), indent=1))
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / dest.name)
            os.replace(staging, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Single files (configs, tokenizer files, reports)


def read_bytes(uri: str) -> bytes:
    if not is_s3(uri):
        path = _local_path(uri)
        if not path.is_file():
            raise NotFound(f"{uri}: no such file")
        return path.read_bytes()
    bucket, key = split_s3_uri(uri)
    with _s3_errors(uri, "read"):
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            if _is_missing(exc):
                raise NotFound(f"{uri}: no such object") from None
            raise


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def fetch_file(uri: str, local: str | Path) -> Path:
    """Copy one file (s3:// or local) to the local path; returns that path."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(read_bytes(uri))
    return local



def put_file(local: str | Path, uri: str) -> None:
    """Copy one local file to uri (s3:// or a local path). Readers see the whole file or none: an
    S3 object appears when its upload completes; a local copy is renamed into place."""
    local = Path(local)
    if not is_s3(uri):
        dest = _local_path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(local, tmp)
        os.replace(tmp, dest)
        return
    bucket, key = split_s3_uri(uri)
    with _s3_errors(uri, "upload"):
        _transfer_files([str(local)], lambda manager, path: manager.upload(path, bucket, key), uri)


def list_files(uri: str) -> list[str]:
    """Names of the files directly under uri (a folder or s3:// prefix); [] when there are none."""
    if not is_s3(uri):
        path = _local_path(uri)
        return sorted(p.name for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    bucket, prefix = split_s3_uri(uri.rstrip("/"))
    with _s3_errors(uri, "list"):
        keys = _list_keys(bucket, prefix + "/")
    return sorted(name for key in keys if "/" not in (name := key[len(prefix) + 1:]) and name)


def delete_file(uri: str) -> None:
    """Remove one file (s3:// or local); a missing one is no error."""
    if not is_s3(uri):
        _local_path(uri).unlink(missing_ok=True)
        return
    bucket, key = split_s3_uri(uri)
    with _s3_errors(uri, "delete"):
        s3_client().delete_object(Bucket=bucket, Key=key)
