"""One run per work folder, and what a dead run leaves: the folder lock (a second `gpt2ops run` names
the holder and exits 2; a holder that died is found by the next run), the run records `--resume`
reads, the processes of a dead run found by the pipeline run id they inherited, the embedded S3
server that dies with its parent and says why it could not start, and MLflow runs left RUNNING.
Real processes, a real SeaweedFS, a real MLflow store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from gpt2core.cli import main
from gpt2core.errors import ConfigError, StorageError
from gpt2core.platform import tracking
from gpt2core.platform.context import ENV_RUN_ID, RunContext
from gpt2core.platform.s3server import SeaweedS3Server, stale_servers
from gpt2core.platform.work_folder import (RunRecord, WorkFolder, WorkFolderBusy, kill_processes,
                                           leftover_processes)

ROOT = Path(__file__).resolve().parents[1]


def python_child(code: str, *, env: dict[str, str] | None = None,
                 ready: Path | None = None) -> subprocess.Popen:
    """A Python process running code (with this checkout importable), started in its own session;
    waits until it created ``ready`` when given."""
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], start_new_session=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    while ready is not None and not ready.exists():
        assert child.poll() is None, f"the child exited with {child.returncode} before it was ready"
        time.sleep(0.05)
    return child


def hold_lock(work: Path, run_id: str) -> tuple[subprocess.Popen, Path]:
    ready = work.parent / f"{work.name}.held"
    child = python_child(f"""
        import pathlib, time
        from gpt2core.platform.work_folder import WorkFolder
        with WorkFolder({str(work)!r}).lock() as held:
            held.set_run({run_id!r})
            pathlib.Path({str(ready)!r}).touch()
            time.sleep(600)
        """, ready=ready)
    return child, ready


def test_a_second_run_in_a_held_folder_names_the_holder_and_exits_2(tmp_path, capsys):
    work = tmp_path / "work"
    holder, _ = hold_lock(work, "run-held-1")
    try:
        code = main(["run", "--work_dir", str(work), "--max_steps", "1"])
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert len(err.splitlines()) == 1
        assert f"{work}: in use by another `gpt2ops run` (pid {holder.pid} on " in err
        assert "started 20" in err and "pipeline run run-held-1" in err
        with pytest.raises(WorkFolderBusy):
            with WorkFolder(work).lock():
                pass
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's lock; the file still names it, so the next run knows
    # that run died without ending, and which pipeline run to clean up after.
    with WorkFolder(work).lock() as held:
        assert held.dead_holder["pid"] == holder.pid and held.dead_holder["run_id"] == "run-held-1"
    with WorkFolder(work).lock() as held:  # that one ended cleanly
        assert held.dead_holder is None


def test_run_records_and_what_resume_refuses(tmp_path, capsys):
    work = WorkFolder(tmp_path / "work")
    with pytest.raises(ConfigError, match="no run was started in .*nothing to resume"):
        work.record(None)
    first = RunRecord(run_id="aaa", run_name="first", experiment="e", arguments={"max_steps": 3},
                      shared_cache=True, started=1000.0, status="FAILED")
    second = RunRecord(run_id="bbb", run_name="second", experiment="e", arguments={}, shared_cache=False,
                       started=2000.0, status="FINISHED")
    work.save_record(second)
    work.save_record(first)
    assert [r.run_id for r in work.records()] == ["aaa", "bbb"]
    assert work.record(None) == second and work.record("aaa") == first
    with pytest.raises(ConfigError, match=r"--resume zzz: no such run in .*\(runs started there: aaa, bbb\)"):
        work.record("zzz")

    code = main(["run", "--work_dir", str(work.root), "--resume", "--max_steps", "3"])
    assert code == 2
    assert "--resume continues a run with the parameters and caching it was started with; leave out " \
           "--max_steps" in capsys.readouterr().err
    code = main(["run", "--work_dir", str(work.root), "--resume"])  # the last one finished
    assert code == 2
    assert "--resume: run bbb (second, started " in capsys.readouterr().err


def test_the_processes_of_a_dead_run_are_found_by_its_run_id_and_killed(tmp_path):
    ready = tmp_path / "ready"
    orphan = python_child(f"import pathlib, time; pathlib.Path({str(ready)!r}).touch(); time.sleep(600)",
                          env={ENV_RUN_ID: "dead-run-7"}, ready=ready)
    bystander = python_child("import time; time.sleep(600)", env={ENV_RUN_ID: "dead-run-77"})
    try:
        assert leftover_processes("dead-run-7") == [orphan.pid]
        kill_processes([orphan.pid])
        assert orphan.wait(10) == -signal.SIGKILL
        assert bystander.poll() is None  # another run's process, left alone
    finally:
        for child in (orphan, bystander):
            child.kill()
            child.wait()


def test_the_embedded_s3_server_dies_with_its_parent_and_a_failed_start_says_why(tmp_path):
    data = tmp_path / "s3"
    ready = tmp_path / "serving"
    parent = python_child(f"""
        import pathlib, time
        from gpt2core.platform.s3server import SeaweedS3Server
        server = SeaweedS3Server(pathlib.Path({str(data)!r})).start()
        pathlib.Path({str(ready)!r}).write_text(str(server._proc.pid))
        time.sleep(600)
        """, ready=ready)
    while not ready.read_text():
        time.sleep(0.05)
    weed = int(ready.read_text())
    assert stale_servers(data) == [weed]
    os.kill(parent.pid, signal.SIGKILL)  # the parent only, as the OOM killer would
    parent.wait()
    deadline = time.monotonic() + 10
    while stale_servers(data) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stale_servers(data) == []  # the parent-death signal took the server down too

    # A server another process left on the data folder (started without that signal, as an older
    # gpt2ops did): a new one on the same folder fails, saying why and who holds the folder.
    with SeaweedS3Server(data) as first:
        command = first._proc.args
    leftover = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until it serves (holds the folder)
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", first.ports["s3.port"])) == 0:
                    break
            time.sleep(0.2)
        assert stale_servers(data) == [leftover.pid]
        with pytest.raises(StorageError) as caught:
            SeaweedS3Server(data, startup_timeout_s=20).start()
        message = str(caught.value)
        assert message.startswith("SeaweedFS exited with code ")
        assert "resource temporarily unavailable" in message
        assert f"another SeaweedFS, pid {leftover.pid}, serves {data.resolve() / 'data'}" in message
    finally:
        leftover.kill()
        leftover.wait()


def test_mlflow_runs_a_dead_run_left_running_are_closed_and_a_resumed_run_keeps_its_parent(tmp_path):
    ctx = RunContext(pipeline_run_id=f"orphan-{time.time_ns()}", artifact_root=str(tmp_path / "art"),
                     experiment="work-folder-tests")
    parent_id = tracking.start_pipeline_run(ctx, params={"max_steps": 3}, run_name="orphaned")
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name(ctx.experiment).experiment_id
    stage = client.create_run(experiment_id, run_name="train", tags={
        "mlflow.parentRunId": parent_id, "gpt2ops.pipeline_run_id": ctx.pipeline_run_id})
    nested = client.create_run(experiment_id, run_name="evaluate", tags={
        "gpt2ops.pipeline_run_id": f"{ctx.pipeline_run_id}/champion-v1"})
    other = tracking.start_pipeline_run(RunContext(pipeline_run_id=f"{ctx.pipeline_run_id}0",
                                                   artifact_root="/x", experiment=ctx.experiment))

    closed = tracking.close_orphaned_runs(ctx.pipeline_run_id, ctx.experiment, "its process died")
    assert sorted(closed) == sorted([parent_id, stage.info.run_id, nested.info.run_id])
    for run_id in closed:
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and run.data.tags["gpt2ops.error"] == "its process died"
    assert client.get_run(other).info.status == "RUNNING"  # another pipeline run

    # The run resumed: the same parent run again, RUNNING, its error gone.
    assert tracking.start_pipeline_run(ctx, run_name="orphaned") == parent_id
    reopened = client.get_run(parent_id)
    assert reopened.info.status == "RUNNING" and "gpt2ops.error" not in reopened.data.tags
    tracking.end_pipeline_run(parent_id)
    tracking.end_pipeline_run(other)
