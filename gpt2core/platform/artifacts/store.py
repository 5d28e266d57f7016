"""Artifact stores, a local folder tree or an S3 bucket behind one interface, and the artifact
operations on top of them. ``store_for(uri)`` picks the store by the URI's scheme, once per call;
nothing below it asks which kind of store it has.

An artifact is a folder of files plus a ``MANIFEST.json`` written LAST (see ``manifest``): an
artifact whose manifest is missing does not exist, and readers verify sizes and checksums.
"""

from __future__ import annotations

import abc
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from gpt2core.errors import StorageError
from gpt2core.platform.artifacts.manifest import (MANIFEST, build_manifest, manifest_bytes, manifest_digest,
                                                  parse_manifest, sub_manifest, verify_files)
from gpt2core.platform.artifacts.s3 import (OutageWindow, download_files, is_missing, list_keys, s3_client,
                                            s3_errors, upload_file, upload_files)
from gpt2core.platform.artifacts.uris import enclosing, is_s3, join, local_path, s3_key, split_s3_uri
from gpt2core.platform.disk import disk_space
from gpt2core.platform.settings import settings


class NotFound(StorageError):
    """The object or artifact does not exist (an artifact without its manifest does not)."""


def scratch_root() -> str | None:
    """Where downloads and staging folders go ($GPT2OPS_SCRATCH_DIR, created; else None: the
    system temp folder)."""
    root = settings().scratch_dir
    if root is None:
        return None
    root.mkdir(parents=True, exist_ok=True)
    return str(root)


class ArtifactStore(abc.ABC):
    """Where artifacts and single files live. URIs passed in are of this store's scheme."""

    #: Reading an artifact means downloading it (so one copy per node is worth sharing).
    remote: bool

    @abc.abstractmethod
    def read_bytes(self, uri: str) -> bytes:
        """One file's bytes; NotFound when there is none."""

    @abc.abstractmethod
    def put_file(self, local: Path, uri: str) -> None:
        """Copy one local file to uri; readers see the whole file or none."""

    @abc.abstractmethod
    def list_files(self, uri: str) -> list[str]:
        """Names of the files directly under the folder uri, sorted; [] when none."""

    @abc.abstractmethod
    def delete_file(self, uri: str) -> None:
        """Remove one file; a missing one is no error."""

    @abc.abstractmethod
    def publish(self, folder: Path, uri: str, manifest: dict,
                on_file_done: Callable[[str], None] | None) -> None:
        """Write folder's files (those of manifest) as the artifact at uri: the old manifest goes
        first (the old artifact stops existing), the new one last."""

    @abc.abstractmethod
    def fetch(self, uri: str, manifest: dict, folder: Path) -> None:
        """Copy the files manifest lists from the folder at uri into folder (unverified)."""

    @abc.abstractmethod
    def open_input(self, uri: str, manifest: dict | None) -> contextlib.AbstractContextManager[Path]:
        """A local folder holding the artifact (or a folder inside one) at uri, for a block; with a
        manifest, exactly the files it lists, checksums verified."""

    @abc.abstractmethod
    def open_output(self, uri: str) -> contextlib.AbstractContextManager[Path]:
        """An empty local folder, published as the artifact at uri when the block exits cleanly."""


class LocalStore(ArtifactStore):
    """Artifacts in local folders: used in place, published by one atomic rename."""

    remote = False

    def read_bytes(self, uri: str) -> bytes:
        path = local_path(uri)
        if not path.is_file():
            raise NotFound(f"{uri}: no such file")
        return path.read_bytes()

    def put_file(self, local: Path, uri: str) -> None:
        dest = local_path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        with disk_space(dest.parent, doing=f"copying {local}", needed=local.stat().st_size, remove=[tmp]):
            shutil.copyfile(local, tmp)
        os.replace(tmp, dest)

    def list_files(self, uri: str) -> list[str]:
        path = local_path(uri)
        return sorted(p.name for p in path.iterdir() if p.is_file()) if path.is_dir() else []

    def delete_file(self, uri: str) -> None:
        local_path(uri).unlink(missing_ok=True)

    def publish(self, folder: Path, uri: str, manifest: dict,
                on_file_done: Callable[[str], None] | None) -> None:
        dest = local_path(uri)
        (dest / MANIFEST).unlink(missing_ok=True)
        dest.mkdir(parents=True, exist_ok=True)
        for entry in manifest["files"]:
            (dest / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / entry["path"], dest / entry["path"])
            if on_file_done:
                on_file_done(entry["path"])
        (dest / MANIFEST).write_bytes(manifest_bytes(manifest))

    def fetch(self, uri: str, manifest: dict, folder: Path) -> None:
        src = local_path(uri)
        for entry in manifest["files"]:
            (folder / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / entry["path"], folder / entry["path"])

    @contextlib.contextmanager
    def open_input(self, uri: str, manifest: dict | None) -> Iterator[Path]:
        """Used in place; if it has a manifest (a stage wrote it) its files must be there with the
        listed sizes (with the manifest given: its files, with their sha256); a plain folder of
        user data is accepted as is."""
        path = local_path(uri)
        if not path.is_dir():
            raise NotFound(f"{uri}: no such artifact (not a folder)")
        if manifest is not None:
            verify_files(path, manifest, str(uri), checksums=True)
        elif (path / MANIFEST).is_file():
            verify_files(path, read_manifest(str(path)), str(uri), checksums=False)
        yield path

    @contextlib.contextmanager
    def open_output(self, uri: str) -> Iterator[Path]:
        dest = local_path(uri)
        # An older version of the artifact is replaced; anything else there is the user's, and stays.
        if dest.exists() and not (dest / MANIFEST).is_file() and (not dest.is_dir() or any(dest.iterdir())):
            raise StorageError(f"{uri}: already holds files that are not an artifact (no {MANIFEST}); choose "
                               f"another output folder or empty this one (nothing was overwritten)")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            # Staging beside the destination, so publishing is one atomic rename on the same filesystem.
            staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.staging-", dir=dest.parent))
        except OSError as exc:
            raise StorageError(f"{uri}: cannot write there ({exc.strerror}: {exc.filename})") from None
        try:
            with disk_space(dest.parent, doing=f"writing {uri}"):
                yield staging
                (staging / MANIFEST).write_bytes(manifest_bytes(build_manifest(staging)))
            # mkdtemp makes the folder 0700; published, it gets the mode a plain mkdir would give,
            # so others sharing the volume (another uid in a pod, a team folder) can read it.
            staging.chmod(0o777 & ~_umask())
            if dest.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
                os.replace(dest, old / dest.name)
                os.replace(staging, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


class S3Store(ArtifactStore):
    """Artifacts under ``s3://bucket/prefix``: downloaded into and uploaded from scratch folders;
    every call rides out an outage (``s3.OutageWindow``) and fails as a StorageError."""

    remote = True

    def read_bytes(self, uri: str) -> bytes:
        bucket, key = split_s3_uri(uri)
        with s3_errors(uri, "read"):
            try:
                return OutageWindow(uri, "read").call(
                    lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())
            except Exception as exc:
                if is_missing(exc):
                    raise NotFound(f"{uri}: no such object") from None
                raise

    def put_file(self, local: Path, uri: str) -> None:
        with s3_errors(uri, "upload"):
            upload_file(local, uri, OutageWindow(uri, "upload"))

    def list_files(self, uri: str) -> list[str]:
        bucket, prefix = split_s3_uri(uri)
        with s3_errors(uri, "list"):
            keys = list_keys(bucket, f"{prefix}/", OutageWindow(uri, "list"))
        return sorted(name for key in keys if "/" not in (name := key[len(prefix) + 1:]) and name)

    def delete_file(self, uri: str) -> None:
        bucket, key = split_s3_uri(uri)
        with s3_errors(uri, "delete"):
            OutageWindow(uri, "delete").call(lambda: s3_client().delete_object(Bucket=bucket, Key=key))

    def publish(self, folder: Path, uri: str, manifest: dict,
                on_file_done: Callable[[str], None] | None) -> None:
        """Old manifest deleted, files uploaded, files of an older version deleted, new manifest:
        all in one outage window, so an outage at any point (before the first call, after the
        last file) is ridden out the same."""
        bucket, prefix = split_s3_uri(uri)
        manifest_key = s3_key(prefix, MANIFEST)
        window = OutageWindow(uri, "upload")
        with s3_errors(uri, "upload"):
            window.call(lambda: s3_client().delete_object(Bucket=bucket, Key=manifest_key))
            stale = set(list_keys(bucket, f"{prefix}/", window))
            upload_files(uri, folder, [entry["path"] for entry in manifest["files"]], window,
                         total_bytes=manifest["total_bytes"], on_file_done=on_file_done)
            stale -= {s3_key(prefix, entry["path"]) for entry in manifest["files"]}
            for key in sorted(stale):
                window.call(lambda key=key: s3_client().delete_object(Bucket=bucket, Key=key))
            window.call(lambda: s3_client().put_object(Bucket=bucket, Key=manifest_key,
                                                       Body=manifest_bytes(manifest),
                                                       ContentType="application/json"))

    def fetch(self, uri: str, manifest: dict, folder: Path) -> None:
        with s3_errors(uri, "download"):
            download_files(uri, [entry["path"] for entry in manifest["files"]], folder,
                           total_bytes=manifest["total_bytes"])

    @contextlib.contextmanager
    def open_input(self, uri: str, manifest: dict | None) -> Iterator[Path]:
        """Downloaded into a scratch folder (removed afterwards) and checksum-verified."""
        scratch = Path(tempfile.mkdtemp(prefix="gpt2ops-in-", dir=scratch_root()))
        try:
            download_dir(uri, scratch, manifest=manifest)
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    @contextlib.contextmanager
    def open_output(self, uri: str) -> Iterator[Path]:
        split_s3_uri(uri)  # fail on a malformed URI before the stage does its work
        staging = Path(tempfile.mkdtemp(prefix="gpt2ops-out-", dir=scratch_root()))
        try:
            with disk_space(staging.parent, doing=f"staging {uri} for upload"):
                yield staging
            upload_dir(staging, uri)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


_LOCAL, _S3 = LocalStore(), S3Store()


def store_for(uri: str | Path) -> ArtifactStore:
    """The store holding uri: S3 for ``s3://``, else local folders (other schemes fail there)."""
    return _S3 if is_s3(uri) else _LOCAL


# --------------------------------------------------------------------------------------------------
# Single files (configs, tokenizer files, reports, checkpoints)


def read_bytes(uri: str) -> bytes:
    """A file's bytes (s3:// or local); NotFound when it does not exist."""
    return store_for(uri).read_bytes(uri)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def fetch_file(uri: str, local: str | Path) -> Path:
    """Copy one file (s3:// or local) to the local path; returns that path."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    data = read_bytes(uri)
    with disk_space(local.parent, doing=f"copying {uri}", needed=len(data), remove=[local]):
        local.write_bytes(data)
    return local


def put_file(local: str | Path, uri: str) -> None:
    """Copy one local file to uri (s3:// or a local path). Readers see the whole file or none: an
    S3 object appears when its upload completes; a local copy is renamed into place."""
    store_for(uri).put_file(Path(local), uri)


def list_files(uri: str) -> list[str]:
    """Names of the files directly under uri (a folder or s3:// prefix); [] when there are none."""
    return store_for(uri).list_files(uri)


def delete_file(uri: str) -> None:
    """Remove one file (s3:// or local); a missing one is no error."""
    store_for(uri).delete_file(uri)


# --------------------------------------------------------------------------------------------------
# Artifacts


def read_manifest(uri: str) -> dict:
    """The artifact's manifest; NotFound when it has none (it does not exist, or is partial)."""
    try:
        data = read_bytes(join(uri, MANIFEST))
    except NotFound:
        raise NotFound(f"{uri}: no such artifact (no {MANIFEST}: never written, or its upload did "
                       "not finish)") from None
    return parse_manifest(data, str(uri).rstrip("/"))


def artifact_exists(uri: str) -> bool:
    try:
        read_manifest(uri)
    except NotFound:
        return False
    return True


def find_artifact(uri: str, *, max_depth: int = 4) -> tuple[str, dict, str]:
    """(artifact URI, its manifest, uri's folder inside it): uri itself when it is an artifact, else
    the nearest enclosing one up to max_depth folders up (a dataset's ``train/`` is inside the
    dataset artifact). NotFound when there is none."""
    for artifact, sub in enclosing(uri, max_depth):
        try:
            return artifact, read_manifest(artifact), sub
        except NotFound:
            continue
    raise NotFound(f"{str(uri).rstrip('/')}: no such artifact (no {MANIFEST} here or in the folders "
                   "above: never written, or its upload did not finish)")


def folder_manifest(uri: str, found: tuple[str, dict, str] | None = None) -> tuple[str, dict]:
    """(the folder's URI, the manifest of its files) for an artifact or a folder inside one; found:
    ``find_artifact(uri)`` when the caller has it already."""
    artifact, manifest, sub = found or find_artifact(uri)
    if not sub:
        return artifact, manifest
    inside = sub_manifest(manifest, sub)
    if inside is None:
        raise NotFound(f"{uri}: artifact {artifact} has no folder {sub}")
    return join(artifact, sub), inside


def artifact_digest(uri: str) -> str | None:
    """manifest_digest of the artifact holding uri (the dataset hash of ``<dataset>/train``), or None
    when uri is in no artifact (a plain local folder; a missing one fails where it is read)."""
    try:
        return manifest_digest(find_artifact(uri)[1])
    except NotFound:
        return None


def upload_dir(local: str | Path, uri: str, *,
               on_file_done: Callable[[str], None] | None = None) -> dict:
    """Publish a local folder as the artifact at uri (s3:// or a local path); returns its manifest.

    Order makes a failure safe: the old manifest goes first (the old artifact stops existing), then
    the files, then (S3) leftovers of an older version are deleted, and the new manifest goes last.
    on_file_done(relative_path) is called as each file lands (progress hooks, fault tests).
    """
    local = Path(local)
    if not local.is_dir():
        raise StorageError(f"{local}: not a folder, nothing to upload to {uri}")
    manifest = build_manifest(local)
    store_for(uri).publish(local, uri, manifest, on_file_done)
    return manifest


def download_dir(uri: str, local: str | Path, *, manifest: dict | None = None) -> dict:
    """Download the artifact at uri (or a folder inside one) into local (created), verifying every
    file's size and sha256 against the manifest (the one given: then uri is the artifact itself and
    its files must match it); the manifest is copied too. Returns the manifest."""
    local = Path(local)
    if manifest is None:
        uri, manifest = folder_manifest(uri)
    with disk_space(local, doing=f"downloading {uri}", needed=manifest["total_bytes"],
                    remove=[local / entry["path"] for entry in manifest["files"]]):
        store_for(uri).fetch(uri, manifest, local)
    verify_files(local, manifest, uri, checksums=True)
    (local / MANIFEST).write_bytes(manifest_bytes(manifest))
    return manifest


def local_input(uri: str, *, manifest: dict | None = None) -> contextlib.AbstractContextManager[Path]:
    """A local folder holding the artifact at uri, for the duration of the block.

    s3://: downloaded into a scratch folder (removed afterwards) and checksum-verified; no manifest
    means no artifact. uri may also be a folder inside an artifact (``<dataset>/train``). Local
    path: used in place; if it has a manifest (it was written by a stage) its files must be present
    with the listed sizes; a plain folder of user data is accepted as is. With ``manifest`` (one the
    caller read and checked), the artifact's files must be exactly those it lists, with their
    sha256, wherever it lives: what the caller checked is what it reads.
    """
    return store_for(uri).open_input(uri, manifest)


def local_output(uri: str) -> contextlib.AbstractContextManager[Path]:
    """An empty folder to write the artifact into; published to uri (manifest last) when the block
    exits cleanly. On error nothing is published and an older artifact at uri is left untouched."""
    return store_for(uri).open_output(uri)


def _umask() -> int:
    """This process's file-mode creation mask. Linux reports it in /proc; elsewhere os.umask reads
    it only by setting it, briefly, which threads creating files at that moment would see."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask
