"""Test-only fault injection: SIGKILL this process's whole process group at a named point.

Put this folder first on ``PYTHONPATH`` of a `gpt2ops` process and set ``GPT2OPS_TEST_KILL_AT`` to
a point; Python imports ``sitecustomize`` at start-up, so every Python the process starts (the
pipeline's steps) arms the same point. Nothing is replaced: each hook calls the real function and
kills at its boundary, the way a preempted node or the OOM killer would stop the run.

Points:
  start:<stage>              as the stage starts (run_stage entered): a stage boundary
  uploading:<stage>/<name>   when the first file of that artifact landed, before its manifest
  published:<stage>/<name>   right after that artifact's manifest was written
  checkpoint:<step>          right after the train stage uploaded the checkpoint of <step>
"""

import os

POINT = os.environ.get("GPT2OPS_TEST_KILL_AT", "")


def _kill() -> None:
    import signal
    import sys

    print(f"kill_points: SIGKILL of process group {os.getpgid(0)} at {POINT}", file=sys.stderr, flush=True)
    os.killpg(os.getpgid(0), signal.SIGKILL)


def _artifact(uri: str) -> str:
    """``<stage>/<name>`` of an artifact URI ``<root>/<run>/<stage>/<name>``."""
    return "/".join(str(uri).rstrip("/").split("/")[-2:])


def _arm() -> None:
    kind, _, target = POINT.partition(":")
    if kind == "start":
        import gpt2core.stages as stages

        real_run_stage = stages.run_stage

        def run_stage(stage, ctx, request):
            if stage == target:
                _kill()
            return real_run_stage(stage, ctx, request)

        stages.run_stage = run_stage  # before gpt2core.launch imports it by name
    elif kind in ("uploading", "published"):
        from gpt2core.platform.artifacts import store

        real_upload_dir = store.upload_dir

        def upload_dir(local, uri, *, on_file_done=None):
            if _artifact(uri) != target:
                return real_upload_dir(local, uri, on_file_done=on_file_done)
            if kind == "uploading":
                return real_upload_dir(local, uri, on_file_done=lambda path: _kill())
            manifest = real_upload_dir(local, uri, on_file_done=on_file_done)
            _kill()
            return manifest

        store.upload_dir = upload_dir  # what local_output publishes with
    elif kind == "checkpoint":
        from gpt2core.checkpoint_names import checkpoint_name
        from gpt2core.platform.artifacts import store

        for cls in (store.LocalStore, store.S3Store):
            real_put_file = cls.put_file

            def put_file(self, local, uri, _real=real_put_file):
                _real(self, local, uri)
                if str(uri).endswith(f"/train/progress/{checkpoint_name(int(target))}"):
                    _kill()

            cls.put_file = put_file
    elif POINT:
        raise ValueError(f"GPT2OPS_TEST_KILL_AT={POINT!r}: unknown kill point")


if POINT:
    _arm()
