"""Work done in another Python process that reports back through a result file.

Some work must run in a Python of its own: the Cerebras SDK's (torch 2.4, one backend per process)
and the compile stage's timing runs (fresh compiler caches). Both go the same way:

    parent: run_child_module(python, "gpt2core.x", request)   # writes request.json, starts the child
    child:  python -m gpt2core.x --request request.json --result result.json
            -> child_main(handle): result = handle(request); written as a StageResult (result.json)

The result file has the format of every stage's result (``gpt2core.platform.results``); a child that
failed with a gpt2ops error reports its class and message, and the parent raises that class again.
Output lines stream through while the child runs (``on_line`` may pick some out, e.g. metrics).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gpt2core.errors import Gpt2opsError, TrainingError
from gpt2core.platform.results import RESULT_FILE, StageResult, read_result, write_result

log = logging.getLogger(__name__)

TAIL_LINES = 40


def run_child_module(python: str, module: str, request: Mapping[str, Any], *, what: str,
                     env: Mapping[str, str] | None = None, timeout_s: float | None = None,
                     on_line: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """Run ``python -m module --request R --result F`` and return the ``details`` of its result.

    ``what`` names the work in errors; ``on_line(line)`` sees every output line and returns True for
    lines it consumed (the others go to stderr). Raises the child's own gpt2ops error class when it
    reported one, a TrainingError with the last output lines when it died without a result, and a
    TrainingError when it ran over ``timeout_s`` seconds (it is killed)."""
    with tempfile.TemporaryDirectory(prefix="gpt2ops-child-") as tmp:
        request_file, result_file = Path(tmp) / "request.json", Path(tmp) / RESULT_FILE
        request_file.write_text(json.dumps(dict(request)))
        command = [python, "-m", module, "--request", str(request_file), "--result", str(result_file)]
        log.info("%s: %s", what, " ".join(command))
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        with subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as child:
            try:
                _stream(child, tail, on_line, timeout_s, what)
            except BaseException:  # Ctrl-C, a callback's error, a timeout: do not leave the child going
                child.kill()
                raise
            returncode = child.wait()
        result = read_result(str(result_file)) if result_file.is_file() else None
    if result is not None and result.status == "failed":
        result.raise_if_failed()
    if returncode != 0 or result is None:
        raise TrainingError(f"{what} failed in {python} (exit code {returncode}); last output:\n" + "\n".join(tail))
    return result.details


def _stream(child: subprocess.Popen, tail: collections.deque, on_line: Callable[[str], bool] | None,
            timeout_s: float | None, what: str) -> None:
    import threading

    timer = None
    if timeout_s is not None:
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            child.kill()

        timer = threading.Timer(timeout_s, expire)
        timer.start()
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if on_line is not None and on_line(line.rstrip("\n")):
                continue
            tail.append(line.rstrip("\n"))
            sys.stderr.write(line)
    finally:
        if timer is not None:
            timer.cancel()
    if timer is not None and expired.is_set():
        raise TrainingError(f"{what} took over {timeout_s:.0f} s and was stopped")


def child_main(handle: Callable[[dict[str, Any]], dict[str, Any]], argv: list[str] | None = None) -> int:
    """The child side: read ``--request``, run ``handle(request)``, write its return value as the
    ``details`` of a StageResult to ``--result``; a gpt2ops error is written with its class and
    message (exit 2), anything else with its traceback's last lines (exit 1)."""
    parser = argparse.ArgumentParser(description="(internal) run a request, write the result file")
    parser.add_argument("--request", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    request = json.loads(args.request.read_text())
    try:
        result, code = StageResult(details=handle(request)), 0
    except Gpt2opsError as exc:
        result, code = StageResult.failure("", exc), 2
    except Exception as exc:  # noqa: BLE001 - the parent shows what went wrong
        traceback.print_exc()
        result = StageResult.failure("", TrainingError(f"{type(exc).__name__}: {exc}"))
        code = 1
    write_result(str(args.result), result)
    return code
