"""Artifact storage behind one interface for local paths and s3:// URIs.

PLACEHOLDER (local paths only) until the S3 implementation lands; signatures are the contract:
- local_input(uri) -> context manager yielding a local Path holding the artifact's files
  (downloaded and checksum-verified against MANIFEST.json for s3://);
- local_output(uri) -> context manager yielding an empty local Path to write into; on clean exit the
  files are published to uri with MANIFEST.json written last; on error nothing is published.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gpt2core.errors import StorageError

MANIFEST = "MANIFEST.json"


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _local_path(uri: str) -> Path:
    uri = str(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise StorageError(f"{uri}: S3 support not available yet (expected a local path)")
    return Path(uri)


def build_manifest(folder: Path) -> dict:
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        files.append({"path": path.relative_to(folder).as_posix(), "bytes": path.stat().st_size,
                      "sha256": h.hexdigest()})
    return {"files": files, "total_bytes": sum(f["bytes"] for f in files)}


@contextlib.contextmanager
def local_input(uri: str) -> Iterator[Path]:
    path = _local_path(uri)
    if not path.exists():
        raise StorageError(f"{uri}: no such artifact")
    yield path


@contextlib.contextmanager
def local_output(uri: str) -> Iterator[Path]:
    dest = _local_path(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=dest.parent))
    try:
        yield staging
        (staging / MANIFEST).write_text(json.dumps(build_manifest(staging), indent=1))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
