"""Artifact URIs: ``s3://bucket/key`` or a local path (``file://`` allowed). The one place that
tells the schemes apart; the rest works through the store ``store_for(uri)`` picks."""

from __future__ import annotations

from pathlib import Path

from gpt2core.errors import StorageError


def is_s3(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")`` (no slash at either end of the key).

    Raises StorageError for anything that is not ``s3://bucket[/key]``."""
    bucket, _, key = str(uri)[len("s3://"):].partition("/")
    if not is_s3(uri) or not bucket:
        raise StorageError(f"{uri}: not an S3 URI (expected s3://bucket/key)")
    return bucket, key.strip("/")


def s3_key(prefix: str, path: str) -> str:
    """The object key of ``path`` under ``prefix`` (either may be empty)."""
    return "/".join(part for part in (prefix, path) if part)


def local_path(uri: str | Path) -> Path:
    """The Path of a local URI; StorageError for any scheme but ``file://``."""
    uri = str(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported URI scheme (expected a local path or s3://bucket/key)")
    return Path(uri)


def join(uri: str, *parts: str) -> str:
    """``join("s3://b/run", "train", "MANIFEST.json")`` -> ``"s3://b/run/train/MANIFEST.json"``."""
    return "/".join([str(uri).rstrip("/"), *parts])


def enclosing(uri: str, max_depth: int) -> list[tuple[str, str]]:
    """(folder, uri's path inside it) for uri itself and up to max_depth folders above it, nearest
    first; never above an S3 bucket. ``s3://b/d/train`` -> ``[("s3://b/d/train", ""), ("s3://b/d",
    "train")]``."""
    uri = str(uri).rstrip("/")
    if is_s3(uri):
        bucket, key = split_s3_uri(uri)
        parts = key.split("/") if key else []
        return [(f"s3://{bucket}/{'/'.join(parts[:depth])}", "/".join(parts[depth:]))
                for depth in range(len(parts), max(0, len(parts) - max_depth - 1), -1)]
    path = local_path(uri)
    return [(str(path), "")] + [(str(parent), path.relative_to(parent).as_posix())
                                for parent in list(path.parents)[:max_depth]]
