"""shared_local_input: one download per machine for all its processes, against a real S3 (SeaweedFS)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2core.platform import artifacts as storage
from gpt2core.platform.artifacts.shared_input import _shared_slot
from gpt2core.platform.settings import reload_settings

REPO = Path(__file__).resolve().parents[1]

# A process of a node: enters the shared input, records what it sees, and stays in its block until
# all N are in theirs (so no one leaves, and cleans up, before the last has entered).
WORKER = """
import hashlib, json, logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from gpt2core.platform import artifacts as storage
uri, sync, me, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
with storage.shared_local_input(uri) as path:
    files = {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(path.rglob("*")) if p.is_file()}
    (sync / f"in-{me}").write_text("")
    give_up = time.monotonic() + 90
    while len(list(sync.glob("in-*"))) < n and time.monotonic() < give_up:
        time.sleep(0.05)
print(json.dumps({"path": str(path), "files": files}))
"""


def _publish(uri: str, files: dict[str, bytes]) -> None:
    with storage.local_output(uri) as out:
        for rel, data in files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _left_in(scratch: Path) -> list[str]:
    """What the shared root still holds besides the (empty) lock files, which stay by design."""
    root = scratch / f"gpt2ops-shared-{os.getuid()}"
    return [p.name for p in root.iterdir() if p.suffix not in (".lock", ".users")]


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GPT2OPS_SCRATCH_DIR", str(tmp_path / "scratch"))
    reload_settings()
    return tmp_path / "scratch"


def dataset(seed: bytes) -> dict[str, bytes]:
    return {f"train/data_{i}.h5": hashlib.sha256(seed + bytes([i])).digest() * 20_000 for i in range(4)} | {
        "val/data_0.h5": os.urandom(3_000), "data_params.json": b'{"max_seq_length": 128}'}


def test_processes_of_a_node_share_one_download(s3_root, scratch, tmp_path):
    files = dataset(b"v1")
    _publish(f"{s3_root}/dataset", files)
    uri, n = f"{s3_root}/dataset/train", 4
    sync = tmp_path / "sync"
    sync.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, uri, str(sync), str(i), str(n)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, LOCAL_WORLD_SIZE=str(n)))
             for i in range(n)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    logs = "".join(err for _, err in results)
    assert logs.count(f"downloading {uri} once for the {n} processes of this node") == 1, logs
    assert logs.count(f"using {uri}, downloaded already on this node") == n - 1, logs
    seen = [json.loads(out) for out, _ in results]
    assert len({s["path"] for s in seen}) == 1
    expected = {rel[len("train/"):]: hashlib.sha256(data).hexdigest()
                for rel, data in files.items() if rel.startswith("train/")}
    for s in seen:
        assert {k: v for k, v in s["files"].items() if k != storage.MANIFEST} == expected
    assert not Path(seen[0]["path"]).exists()
    assert _left_in(scratch) == []  # neither the folder nor a .partial


def test_crashed_download_is_redone_and_a_changed_artifact_gets_a_new_folder(s3_root, scratch):
    _publish(f"{s3_root}/dataset", dataset(b"v1"))
    uri = f"{s3_root}/dataset/train"
    folder, _ = _shared_slot(uri)
    partial = folder.with_name(folder.name + ".partial")
    (partial / "train").mkdir(parents=True)
    (partial / "data_0.h5").write_bytes(b"half a file from a downloader that died")
    with storage.shared_local_input(uri) as first:
        assert first == folder and not partial.exists()
        old = _digests(first)
        assert old["data_0.h5"] == hashlib.sha256(dataset(b"v1")["train/data_0.h5"]).hexdigest()
        assert not (first / "train").exists()
        with storage.shared_local_input(uri) as again:  # the same process again: no self-deadlock
            assert again == first
        assert first.is_dir()  # still held by the outer block

        v2 = dataset(b"v2")
        _publish(f"{s3_root}/dataset", v2)  # a new manifest: new content key, never the old copy
        with storage.shared_local_input(uri) as second:
            assert second != first
            assert _digests(second)["data_0.h5"] == hashlib.sha256(v2["train/data_0.h5"]).hexdigest()
            assert _digests(first) == old  # the older copy, still in use, is left alone
        assert not second.exists()
    assert _left_in(scratch) == []


def test_local_paths_are_used_in_place(tmp_path):
    _publish(str(tmp_path / "dataset"), {"train/data_0.h5": b"x"})
    with storage.shared_local_input(str(tmp_path / "dataset" / "train")) as path:
        assert path == tmp_path / "dataset" / "train"
    assert path.is_dir()
