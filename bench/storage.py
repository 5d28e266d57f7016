"""Benchmark artifact transfers against plain boto3 peers measured in the same run; prints JSON.

An artifact folder (many shards plus one large file, like an HDF5 dataset) goes to an S3 store and
back:
1. ``upload_dir`` (sha256 manifest, parallel TransferManager, multipart) next to a loop of
   ``put_object`` calls on the same client, one file after another;
2. ``download_dir`` (parallel, every file's sha256 verified) next to a loop of ``get_object`` reads.
A ratio above 1 means ours is faster despite hashing every byte.

    .venv/bin/python bench/storage.py                   # embedded SeaweedFS on 127.0.0.1
    .venv/bin/python bench/storage.py --files 64 --file_mb 4 --large_mb 256
    AWS_ENDPOINT_URL=... AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \\
        .venv/bin/python bench/storage.py --bucket mybucket   # any S3 store
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

from gpt2core.platform import artifacts as storage
from gpt2core.platform.artifacts.s3 import s3_client
from gpt2core.platform.s3server import embedded_s3


def make_artifact(folder: Path, files: int, file_mb: int, large_mb: int) -> int:
    for i in range(files):
        (folder / "train").mkdir(parents=True, exist_ok=True)
        (folder / "train" / f"data_{i:04d}.h5").write_bytes(os.urandom(file_mb << 20))
    (folder / "model.safetensors").write_bytes(os.urandom(large_mb << 20))
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def timed(fn) -> float:  # noqa: ANN001
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=32)
    parser.add_argument("--file_mb", type=int, default=2)
    parser.add_argument("--large_mb", type=int, default=96)
    parser.add_argument("--bucket", default="gpt2ops")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-storage-")))
        if not storage.s3_configured():
            stack.enter_context(embedded_s3(scratch / "s3", bucket=args.bucket))
        src = scratch / "artifact"
        total = make_artifact(src, args.files, args.file_mb, args.large_mb)
        paths = sorted(p for p in src.rglob("*") if p.is_file())
        client, prefix = s3_client(), f"bench/{uuid.uuid4().hex[:8]}"
        uri = f"s3://{args.bucket}/{prefix}/ours"

        def put_loop() -> None:
            for p in paths:
                client.put_object(Bucket=args.bucket, Key=f"{prefix}/peer/{p.relative_to(src)}", Body=p.read_bytes())

        def get_loop() -> None:
            for p in paths:
                client.get_object(Bucket=args.bucket, Key=f"{prefix}/peer/{p.relative_to(src)}")["Body"].read()

        upload_s, put_s = timed(lambda: storage.upload_dir(src, uri)), timed(put_loop)
        download_s = timed(lambda: storage.download_dir(uri, scratch / "down"))
        get_s = timed(get_loop)
    mb = total / 1e6
    print(json.dumps({
        "bytes": total, "files": len(paths), "cpus": os.cpu_count(),
        "upload_dir_MBps": round(mb / upload_s, 1), "put_object_loop_MBps": round(mb / put_s, 1),
        "upload_ratio": round(put_s / upload_s, 2),
        "download_dir_MBps": round(mb / download_s, 1), "get_object_loop_MBps": round(mb / get_s, 1),
        "download_ratio": round(get_s / download_s, 2),
    }, indent=1))


if __name__ == "__main__":
    main()
