"""Run many `gpt2ops` commands fast: a server process that imports the CLI and its heavy libraries
(torch, MLflow, boto3, kfp) once, then forks one child per command. Each child is a process of its
own, as `gpt2ops` started from a shell: its own environment and working folder, stdout and stderr
to files, the CLI's ``main(argv)``, an uncaught exception printed as the interpreter prints it (the
traceback) with exit code 1, atexit handlers run. What it saves is the 3-10 s of imports per command.

    python tests/cli_forkserver.py PARALLEL     # reads one JSON request per line on stdin:
        {"id": ..., "argv": [...], "env": {...}, "cwd": ..., "stdout": path, "stderr": path}
    and writes {"id": ..., "returncode": N} per finished command on stdout, in finishing order.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import traceback


def _preload() -> None:
    import boto3  # noqa: F401
    import mlflow  # noqa: F401
    import torch  # noqa: F401

    import gpt2core.cli  # noqa: F401
    import pipelines.cli  # noqa: F401
    from gpt2core.stages import STAGES, stage_module

    for stage in STAGES:
        stage_module(stage)


def _child(request: dict) -> None:
    """In the forked child: become the command, run it, exit with its code."""
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.argv = ["gpt2ops", *request["argv"]]
    code = 1
    try:
        from gpt2core.cli import main
        from gpt2core.platform.settings import reload_settings

        reload_settings()
        code = main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)


def serve(parallel: int) -> None:
    _preload()
    print(json.dumps({"ready": True}), flush=True)
    running: dict[int, str] = {}

    def reap_one() -> None:
        pid, status = os.wait()
        print(json.dumps({"id": running.pop(pid), "returncode": os.waitstatus_to_exitcode(status)}), flush=True)

    for line in sys.stdin:
        request = json.loads(line)
        while len(running) >= parallel:
            reap_one()
        pid = os.fork()
        if pid == 0:
            _child(request)
        running[pid] = request["id"]
    while running:
        reap_one()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
