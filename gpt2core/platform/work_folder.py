"""The local work folder of `gpt2ops run` (embedded S3 data, MLflow db, KFP outputs and cache): one
run at a time, a record of every run started in it, and what a dead run left behind.

- ``WorkFolder.lock()``: an exclusive ``flock`` on ``<work>/run.lock`` held for the life of the run.
  The kernel drops it when its holder dies, however it dies (SIGKILL included), so a lock is never
  stale; the file names the holder (pid, host, start time, pipeline run id). A second run fails at
  once naming the holder (``WorkFolderBusy``). The holder clears the file when it ends, so a run that
  takes the lock and still finds a holder named there knows that run died without ending
  (``WorkFolderLock.dead_holder``), and cleans up after it.
- Run records ``<work>/runs/<pipeline run id>.json`` (``RunRecord``): the parameters a run was
  started with, whether it used the shared task cache, its status; ``gpt2ops run --resume`` continues
  the newest one (or a given one) under the same pipeline run id.
- ``leftover_processes(run_id)``: processes of a pipeline run still alive after its `gpt2ops run`
  died (its steps, which kfp.local starts without a parent-death signal), found by the
  ``GPT2OPS_PIPELINE_RUN_ID`` every one of them inherited; ``kill_processes`` ends them.

Linux only (flock, /proc): where `gpt2ops run` runs its steps as local processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpt2core.errors import ConfigError, Gpt2opsError
from gpt2core.platform.context import ENV_RUN_ID

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
RUNS_FOLDER = "runs"


class WorkFolderBusy(Gpt2opsError):
    """Another `gpt2ops run` holds the work folder (the message names it: pid, start time, run id)."""


@dataclass
class RunRecord:
    """A pipeline run started in a work folder: enough to continue it under the same id."""

    run_id: str
    run_name: str
    experiment: str
    arguments: dict[str, object]  # the pipeline parameters it was started with (the run form's)
    shared_cache: bool  # served from / filled the folder's task cache; else a cache of its own
    started: float = field(default_factory=time.time)  # seconds since the epoch
    status: str = "RUNNING"  # RUNNING (or died while running), FINISHED, FAILED

    @property
    def started_text(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))


@dataclass
class WorkFolderLock:
    """The held lock of a work folder."""

    path: Path
    fd: int
    holder: dict[str, object]
    #: The holder the lock file still named when this run took it: a run that died without ending
    #: (pid, host, started, run_id); None when the last run ended cleanly.
    dead_holder: dict[str, object] | None

    def set_run(self, run_id: str) -> None:
        """Name the pipeline run this holder runs, so a run that finds it dead knows what to clean."""
        self.holder["run_id"] = run_id
        _write_holder(self.fd, self.holder)


class WorkFolder:
    """A `gpt2ops run` work folder (created if missing)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[WorkFolderLock]:
        """Hold the folder for this process: WorkFolderBusy naming the holder when another process
        holds it. The holder record is cleared when the block ends (also on errors)."""
        path = self.root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkFolderBusy(f"{self.root}: in use by another `gpt2ops run` ({describe_holder(holder)}); "
                                 f"wait for it to end, or give another --work_dir") from None
        held = WorkFolderLock(path, fd, {"pid": os.getpid(), "host": socket.gethostname(),
                                         "started": time.time(), "run_id": None}, _read_holder(fd) or None)
        _write_holder(fd, held.holder)
        try:
            yield held
        finally:
            os.ftruncate(fd, 0)  # ended: the next run finds no dead holder
            os.close(fd)  # releases the lock

    # ------------------------------------------------------------------ run records

    def save_record(self, record: RunRecord) -> None:
        folder = self.root / RUNS_FOLDER
        folder.mkdir(exist_ok=True)
        tmp = folder / f".{record.run_id}.json.tmp"
        tmp.write_text(json.dumps(asdict(record), indent=1, sort_keys=True) + "\n")
        os.replace(tmp, folder / f"{record.run_id}.json")

    def records(self) -> list[RunRecord]:
        """Every run started in this folder, oldest first."""
        folder = self.root / RUNS_FOLDER
        found = [RunRecord(**json.loads(p.read_text())) for p in folder.glob("*.json")]
        return sorted(found, key=lambda r: r.started)

    def record(self, run_id: str | None) -> RunRecord:
        """The record of run_id, or of the newest run when None; ConfigError naming the folder when
        there is none."""
        runs = self.records()
        if run_id is None:
            if not runs:
                raise ConfigError(f"--resume: no run was started in {self.root} (nothing to resume)")
            return runs[-1]
        found = [r for r in runs if r.run_id == run_id]
        if not found:
            known = ", ".join(r.run_id for r in runs[-5:]) or "none"
            raise ConfigError(f"--resume {run_id}: no such run in {self.root} (runs started there: {known})")
        return found[0]


def describe_holder(holder: dict[str, object] | None) -> str:
    """``pid 123 on host, started 2026-11-30 10:00:00, pipeline run abc`` (what a holder record says)."""
    if not holder:
        return "starting up"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    run = f", pipeline run {holder['run_id']}" if holder.get("run_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}{run}"


def _read_holder(fd: int) -> dict[str, object]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode(errors="replace").strip()
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {"pid": "?", "note": text[:200]}


def _write_holder(fd: int, holder: dict[str, object]) -> None:
    data = json.dumps(holder).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


# ---------------------------------------------------------------------- what a dead run leaves

def leftover_processes(run_id: str) -> list[int]:
    """Pids of the processes (other than this one) whose environment names pipeline run ``run_id``
    (``GPT2OPS_PIPELINE_RUN_ID``): the steps, and what they started, of a `gpt2ops run` of that id."""
    marker = f"{ENV_RUN_ID}={run_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours
            continue
        if marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return sorted(found)


def kill_processes(pids: list[int], *, timeout_s: float = 10.0) -> None:
    """SIGKILL each pid and wait until it is gone (or a zombie of a parent that is not this process)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
