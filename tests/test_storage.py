"""The artifact store against a real S3 server (SeaweedFS), including its faults."""

from __future__ import annotations

import json
import logging
import os
import threading

import pytest

from gpt2core.errors import StorageError
from gpt2core.platform import artifacts as storage
from gpt2core.platform.artifacts import s3
from gpt2core.platform.artifacts.uris import split_s3_uri
from gpt2core.platform.s3server import SeaweedS3Server
from gpt2core.platform.settings import reload_settings, settings


def _write_tree(folder, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


FILES = {"train/data_0.h5": os.urandom(70_000), "val/data_0.h5": os.urandom(3_000),
         "data_params.json": b'{"max_seq_length": 128}'}


@pytest.mark.parametrize("where", ["s3", "local"])
def test_round_trip_publishes_manifest_last_and_verifies(where, s3_root, tmp_path):
    uri = f"{s3_root}/dataset" if where == "s3" else str(tmp_path / "run" / "dataset")
    assert not storage.artifact_exists(uri)
    with storage.local_output(uri) as out:
        _write_tree(out, FILES)
    manifest = storage.read_manifest(uri)
    assert [f["path"] for f in manifest["files"]] == sorted(FILES)
    assert manifest["total_bytes"] == sum(len(v) for v in FILES.values())
    with storage.local_input(uri) as path:
        for rel, data in FILES.items():
            assert (path / rel).read_bytes() == data
    # the same bytes hash the same wherever they are stored
    local_copy = tmp_path / "copy"
    storage.download_dir(uri, local_copy)
    assert storage.manifest_digest(storage.read_manifest(str(local_copy))) == storage.manifest_digest(manifest)


@pytest.mark.parametrize("where", ["s3", "local"])
def test_error_inside_output_publishes_nothing_and_keeps_old_artifact(where, s3_root, tmp_path):
    uri = f"{s3_root}/model" if where == "s3" else str(tmp_path / "model")
    with storage.local_output(uri) as out:
        _write_tree(out, {"weights.bin": b"old"})
    with pytest.raises(RuntimeError, match="stage crashed"), storage.local_output(uri) as out:
        _write_tree(out, {"weights.bin": b"new, half written"})
        raise RuntimeError("stage crashed")
    with storage.local_input(uri) as path:
        assert (path / "weights.bin").read_bytes() == b"old"
    fresh = f"{s3_root}/never" if where == "s3" else str(tmp_path / "never")
    with pytest.raises(RuntimeError), storage.local_output(fresh) as out:
        _write_tree(out, {"a": b"x"})
        raise RuntimeError("boom")
    assert not storage.artifact_exists(fresh)
    if where == "s3":
        bucket, prefix = split_s3_uri(fresh)
        assert s3.list_keys(bucket, prefix) == []


def test_a_folder_inside_an_artifact_is_an_input_too(s3_root, tmp_path):
    with storage.local_output(f"{s3_root}/dataset") as out:
        _write_tree(out, FILES)
    with storage.local_input(f"{s3_root}/dataset/train") as path:
        assert sorted(p.name for p in path.iterdir()) == ["MANIFEST.json", "data_0.h5"]
        assert (path / "data_0.h5").read_bytes() == FILES["train/data_0.h5"]
    # the dataset hash of a split is that of the whole artifact, wherever it is stored
    digest = storage.manifest_digest(storage.read_manifest(f"{s3_root}/dataset"))
    assert storage.artifact_digest(f"{s3_root}/dataset/train") == digest
    local = storage.download_dir(f"{s3_root}/dataset", tmp_path / "dataset")
    assert storage.artifact_digest(str(tmp_path / "dataset" / "train")) == storage.manifest_digest(local) == digest
    assert storage.artifact_digest(str(tmp_path)) is None  # a plain folder
    with pytest.raises(storage.NotFound, match="has no folder test"):
        with storage.local_input(f"{s3_root}/dataset/test"):
            pass
    with pytest.raises(storage.NotFound, match="no such artifact"):
        with storage.local_input(f"{s3_root}/elsewhere/train"):
            pass


def test_republish_removes_files_of_the_older_version(s3_root):
    uri = f"{s3_root}/ckpt"
    with storage.local_output(uri) as out:
        _write_tree(out, {"a.bin": b"1", "old/b.bin": b"2"})
    with storage.local_output(uri) as out:
        _write_tree(out, {"a.bin": b"3"})
    bucket, prefix = split_s3_uri(uri)
    assert sorted(s3.list_keys(bucket, prefix + "/")) == [f"{prefix}/MANIFEST.json", f"{prefix}/a.bin"]


def test_multipart_upload_of_a_large_file(s3_root, tmp_path, monkeypatch):
    monkeypatch.setattr(s3, "MULTIPART_BYTES", 5 << 20)  # S3's smallest part size
    big = os.urandom(11 << 20)
    _write_tree(tmp_path / "src", {"big.bin": big})
    storage.upload_dir(tmp_path / "src", f"{s3_root}/big")
    bucket, prefix = split_s3_uri(f"{s3_root}/big")
    head = s3.s3_client().head_object(Bucket=bucket, Key=f"{prefix}/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    with storage.local_input(f"{s3_root}/big") as path:
        assert (path / "big.bin").read_bytes() == big


def test_without_manifest_an_artifact_does_not_exist(s3_root):
    bucket, prefix = split_s3_uri(s3_root)
    s3.s3_client().put_object(Bucket=bucket, Key=f"{prefix}/partial/data.h5", Body=b"x")
    assert not storage.artifact_exists(f"{s3_root}/partial")
    with pytest.raises(storage.NotFound, match=rf"{s3_root}/partial: no such artifact"):
        with storage.local_input(f"{s3_root}/partial"):
            pass


def test_corrupted_object_is_detected_on_download(s3_root):
    uri = f"{s3_root}/dataset"
    with storage.local_output(uri) as out:
        _write_tree(out, {"train/x.h5": b"good bytes"})
    bucket, prefix = split_s3_uri(uri)
    s3.s3_client().put_object(Bucket=bucket, Key=f"{prefix}/train/x.h5", Body=b"evil bytes")
    with pytest.raises(StorageError, match=r"train/x.h5 does not match its sha256"):
        with storage.local_input(uri):
            pass


def test_local_input_checks_a_local_artifact_and_accepts_plain_folders(tmp_path):
    with pytest.raises(storage.NotFound, match="no such artifact"):
        with storage.local_input(str(tmp_path / "missing")):
            pass
    plain = tmp_path / "my_texts"
    _write_tree(plain, {"a.txt": b"hello"})
    with storage.local_input(str(plain)) as path:
        assert path == plain
    with storage.local_output(str(tmp_path / "art")) as out:
        _write_tree(out, {"a.txt": b"hello"})
    (tmp_path / "art" / "a.txt").write_bytes(b"truncated!")
    with pytest.raises(StorageError, match="a.txt has 10 bytes"):
        with storage.local_input(str(tmp_path / "art")):
            pass


def test_a_published_local_artifact_has_the_mode_of_a_plain_folder(tmp_path):
    """Staged in a private temporary folder, published with the mode mkdir gives under the umask,
    so another user of a shared volume can read it."""
    old = os.umask(0o022)
    try:
        with storage.local_output(str(tmp_path / "art")) as out:
            _write_tree(out, {"a.txt": b"hello"})
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    assert (tmp_path / "art").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o755


def test_single_files(s3_root, tmp_path):
    bucket, prefix = split_s3_uri(s3_root)
    s3.s3_client().put_object(Bucket=bucket, Key=f"{prefix}/gpt2.yaml", Body=b"model: {}\n")
    assert storage.read_text(f"{s3_root}/gpt2.yaml") == "model: {}\n"
    assert storage.fetch_file(f"{s3_root}/gpt2.yaml", tmp_path / "c.yaml").read_text() == "model: {}\n"
    with pytest.raises(storage.NotFound, match=rf"{s3_root}/nope.yaml: no such object"):
        storage.read_text(f"{s3_root}/nope.yaml")
    with pytest.raises(StorageError, match="not an S3 URI"):
        storage.read_text("s3:///key")
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.read_text("gs://bucket/key")


def test_wrong_credentials_give_a_clear_error_without_the_secret(s3_server, s3_root, monkeypatch, caplog):
    wrong_secret = "wrong-secret-" + "Z" * 20
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    reload_settings()
    caplog.set_level(logging.DEBUG, logger="gpt2core")
    with pytest.raises(StorageError) as err:
        storage.read_manifest(f"{s3_root}/x")
    message = str(err.value)
    assert f"{s3_root}/x" in message and s3_server.endpoint in message
    assert "SignatureDoesNotMatch" in message and "credentials" in message
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEY")
    reload_settings()
    with pytest.raises(StorageError, match="InvalidAccessKeyId") as err2:
        with storage.local_output(f"{s3_root}/y") as out:
            _write_tree(out, {"a": b"1"})
    for text in (message, str(err2.value), caplog.text):
        assert wrong_secret not in text and s3_server.secret_key not in text


def test_missing_bucket_is_named(s3_server):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist at " + s3_server.endpoint):
        with storage.local_output("s3://no-such-bucket/run1/corpus") as out:
            _write_tree(out, {"a.txt": b"x"})


def test_credentials_from_a_mounted_secret_folder(s3_server, s3_root, tmp_path, monkeypatch):
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        (secret_dir / name).write_text(os.environ[name] + "\n")  # Kubernetes secrets often end in \n
        monkeypatch.delenv(name)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("GPT2OPS_S3_SECRET_DIR", str(secret_dir))
    reload_settings()
    assert settings().aws_endpoint_url == s3_server.endpoint and s3_server.secret_key not in repr(settings())
    with storage.local_output(f"{s3_root}/via-secret") as out:
        _write_tree(out, {"a": b"1"})
    assert storage.artifact_exists(f"{s3_root}/via-secret")


# --- the S3 server stopped in the middle of an upload (a server of its own, not the session's) ---


@pytest.fixture
def own_server(tmp_path, monkeypatch):
    server = SeaweedS3Server(tmp_path / "s3", bucket="faults")
    with server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        reload_settings()
        yield server


def _many_files(folder, n=24, size=20_000) -> None:
    _write_tree(folder, {f"part-{i:03d}.bin": os.urandom(size) for i in range(n)})


def test_server_restarted_mid_upload_completes_through_retries(own_server, tmp_path):
    _many_files(tmp_path / "src")
    uri = "s3://faults/run1/dataset"
    stopped, restarted = threading.Event(), threading.Event()

    def bounce_server(_path: str) -> None:
        if not stopped.is_set():
            stopped.set()
            own_server.stop()  # the next files meet a refused connection and back off
            threading.Timer(1.5, lambda: (own_server.start(), restarted.set())).start()

    manifest = storage.upload_dir(tmp_path / "src", uri, on_file_done=bounce_server)
    restarted.wait(30)
    assert restarted.is_set()
    assert len(manifest["files"]) == 24
    with storage.local_input(uri) as path:  # every byte arrived: checksums verified
        assert sorted(p.name for p in path.glob("*.bin")) == sorted(f["path"] for f in manifest["files"])


URI = "s3://faults/run1/dataset"


@pytest.fixture
def republish(own_server, tmp_path, monkeypatch) -> str:
    """Version 1 (old.bin) published at URI on the fault server, version 2 (24 files) in
    tmp_path/v2; botocore's own retries cut to 2, so the outage window is what rides outages out."""
    _write_tree(tmp_path / "v1", {"old.bin": b"version 1"})
    storage.upload_dir(tmp_path / "v1", URI)
    _many_files(tmp_path / "v2")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    reload_settings()
    return URI


def test_server_gone_mid_upload_fails_cleanly_without_manifest(own_server, republish, tmp_path, monkeypatch):
    uri = republish
    monkeypatch.setenv("GPT2OPS_S3_OUTAGE_S", "2")
    reload_settings()
    with pytest.raises(StorageError, match=rf"{uri}: could not upload at {own_server.endpoint}: .* "
                                           r"past the outage window GPT2OPS_S3_OUTAGE_S=2 s") as err:
        storage.upload_dir(tmp_path / "v2", uri, on_file_done=lambda _path: own_server.stop())
    assert "\n" not in str(err.value)
    own_server.start()
    # neither version reads as complete: v1's manifest went first, v2's never came
    assert not storage.artifact_exists(uri)
    with pytest.raises(storage.NotFound, match="no such artifact"):
        with storage.local_input(uri):
            pass


def _restart_later(server: SeaweedS3Server, after_s: float) -> threading.Thread:
    restart = threading.Timer(after_s, server.start)
    restart.start()
    return restart


def test_server_stopped_before_an_upload_starts_is_ridden_out(own_server, republish, tmp_path):
    """The store is down when the upload begins (its first call, deleting the old manifest, meets a
    refused connection) and back 20 s later: within GPT2OPS_S3_OUTAGE_S (default 120 s) the upload
    completes, with its manifest."""
    uri = republish
    own_server.stop()
    restart = _restart_later(own_server, 20.0)
    try:
        manifest = storage.upload_dir(tmp_path / "v2", uri)
    finally:
        restart.join()
    assert storage.read_manifest(uri) == manifest and len(manifest["files"]) == 24
    with storage.local_input(uri) as path:  # every byte arrived: checksums verified
        assert sorted(p.name for p in path.glob("*.bin")) == sorted(f["path"] for f in manifest["files"])
    bucket, prefix = split_s3_uri(uri)
    assert f"{prefix}/old.bin" not in s3.list_keys(bucket, prefix)  # the older version's file went too


def test_server_stopped_after_the_last_file_is_ridden_out_by_the_manifest(own_server, republish, tmp_path):
    """The last calls of an upload (deleting an older version's files, writing the manifest) meet
    the outage: they are tried again too."""
    uri = republish
    restarts = []

    def stop_after_the_last_file(path: str) -> None:
        if path == "part-023.bin":
            own_server.stop()
            restarts.append(_restart_later(own_server, 3.0))

    manifest = storage.upload_dir(tmp_path / "v2", uri, on_file_done=stop_after_the_last_file)
    restarts[0].join()
    assert storage.read_manifest(uri) == manifest
    bucket, prefix = split_s3_uri(uri)
    assert sorted(s3.list_keys(bucket, prefix)) == sorted(
        [f"{prefix}/{f['path']}" for f in manifest["files"]] + [f"{prefix}/MANIFEST.json"])


def test_single_object_calls_ride_out_an_outage(own_server, tmp_path, monkeypatch):
    """A read, a listing, a put and a delete, all started while the store is down (each in its own
    thread), complete once it is back."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    reload_settings()
    (tmp_path / "c.yaml").write_text("model: {}\n")
    for name in ("c.yaml", "old.yaml"):
        storage.put_file(tmp_path / "c.yaml", f"s3://faults/configs/{name}")
    own_server.stop()
    restart = _restart_later(own_server, 3.0)
    with ThreadPoolExecutor(4) as pool:
        read = pool.submit(storage.read_text, "s3://faults/configs/c.yaml")
        listed = pool.submit(storage.list_files, "s3://faults/configs")
        put = pool.submit(storage.put_file, tmp_path / "c.yaml", "s3://faults/other/d.yaml")
        deleted = pool.submit(storage.delete_file, "s3://faults/configs/old.yaml")
        assert read.result() == "model: {}\n"
        assert set(listed.result()) <= {"c.yaml", "old.yaml"} and "c.yaml" in listed.result()
        put.result()
        deleted.result()
    restart.join()
    assert storage.list_files("s3://faults/configs") == ["c.yaml"]
    assert storage.read_text("s3://faults/other/d.yaml") == "model: {}\n"


def test_embedded_s3_sets_and_restores_the_environment(tmp_path, monkeypatch):
    from gpt2core.platform.s3server import embedded_s3

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with embedded_s3(tmp_path / "s3", bucket="embedded") as server:
        assert os.environ["AWS_ENDPOINT_URL"] == server.endpoint
        with storage.local_output("s3://embedded/r/a") as out:
            _write_tree(out, {"f": b"1"})
        assert json.loads(storage.read_text("s3://embedded/r/a/MANIFEST.json"))["total_bytes"] == 1
    assert "AWS_ENDPOINT_URL" not in os.environ
    assert not server.running
