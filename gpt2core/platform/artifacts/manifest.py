"""MANIFEST.json: what an artifact holds, written last so that no manifest means no artifact.

Format (JSON): ``{"files": [{"path": "train/data_0.h5", "bytes": 70000, "sha256": "<hex>"}, ...],
"total_bytes": 73000}``, files sorted by path (POSIX, relative to the artifact folder), the
manifest itself not listed.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gpt2core.errors import StorageError

MANIFEST = "MANIFEST.json"
_MB = 1 << 20


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(_MB), b""):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(folder: Path) -> dict:
    """The manifest of every file under folder; hashed in threads (hashlib frees the GIL)."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(sha256_file, paths))
    files = [{"path": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size, "sha256": d}
             for p, d in zip(paths, digests)]
    return {"files": files, "total_bytes": sum(f["bytes"] for f in files)}


def manifest_bytes(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=1).encode()


def parse_manifest(data: bytes, uri: str) -> dict:
    """The manifest in data; StorageError naming uri when it is not JSON."""
    try:
        return json.loads(data)
    except ValueError as exc:
        raise StorageError(f"{uri}/{MANIFEST}: not valid JSON ({exc})") from None


def manifest_digest(manifest: dict) -> str:
    """A content hash of an artifact (e.g. the dataset hash tagged on MLflow runs): the sha256 of
    its files' paths and checksums, so the same bytes give the same hash wherever they are stored."""
    listing = "\n".join(f"{f['path']} {f['sha256']}" for f in manifest["files"])
    return hashlib.sha256(listing.encode()).hexdigest()


def sub_manifest(manifest: dict, sub: str) -> dict | None:
    """The manifest of the folder ``sub`` inside the artifact (paths relative to it); None when the
    artifact has no file there."""
    files = [dict(f, path=f["path"][len(sub) + 1:])
             for f in manifest["files"] if f["path"].startswith(sub + "/")]
    return {"files": files, "total_bytes": sum(f["bytes"] for f in files)} if files else None


def verify_files(folder: Path, manifest: dict, uri: str, *, checksums: bool) -> None:
    """Every listed file is in folder with its size (and sha256, when checksums); StorageError
    naming uri and the file otherwise."""
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
