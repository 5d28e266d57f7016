"""No blind unpickling: an artifact whose files get unpickled (the compile stage's torch.compile caches,
Cerebras SDK checkpoints) is read only as the stage that published it recorded it in MLflow. Whoever
can write the artifact's storage (S3 prefix or folder), its MANIFEST.json included, gets a one-line
refusal, never code execution. Real S3 (SeaweedFS), real MLflow, real stages."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from gpt2core.cli import main
from gpt2core.compilation import CACHE_FILE, REPORT_FILE
from gpt2core.errors import StorageError, UntrustedArtifactError
from gpt2core.platform import tracking
from gpt2core.platform.artifacts import local_output, manifest_digest, read_manifest, sha256_file, upload_dir
from gpt2core.platform.context import RunContext
from gpt2core.stages import compile as compile_stage
from gpt2core.stages import run_stage
from gpt2core.stages.inputs import vouched_checkpoint, vouched_input


class RunsCode:
    """Unpickling it runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def ctx_at(root: str) -> RunContext:
    return RunContext(pipeline_run_id="trust-" + uuid.uuid4().hex[:8], artifact_root=root,
                      experiment="trust-tests")


def test_the_train_stage_loads_compile_caches_only_as_the_compile_stage_published_them(
        s3_root, tiny_dataset, tmp_path, capsys):
    import pickle

    ctx = ctx_at(s3_root)
    # An eager config publishes a report only: quick, and a real compile stage's artifact.
    uri = run_stage("compile", ctx, compile_stage.Request(params="gpt2_tiny")).outputs["compile_cache"]
    with vouched_input(uri, "compile_cache") as folder:
        assert json.loads((folder / REPORT_FILE).read_text())["compiled"] is False

    # Someone who can write the prefix swaps in a cache that runs code, with a manifest to match.
    import torch

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / CACHE_FILE).write_bytes(pickle.dumps(RunsCode(marker)))
    (evil / REPORT_FILE).write_text(json.dumps({"compiled": True, "torch_version": torch.__version__}))
    upload_dir(evil, uri)
    with pytest.raises(UntrustedArtifactError, match=rf"^{uri}: refused to load: no stage run in MLflow .* "
                                                     rf"recorded publishing this compile_cache artifact"):
        with vouched_input(uri, "compile_cache"):
            pass
    # The train stage refuses it in one line (exit 2) before anything is loaded.
    code = main(["train", "--params", "gpt2_tiny", "--dataset", str(tiny_dataset), "--max_steps", "1",
                 "--set", "runconfig.torch_compile=true", "--compile_cache", uri,
                 "--model_dir", str(tmp_path / "m"), "--artifact_root", s3_root,
                 "--experiment", ctx.experiment])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"gpt2ops train: error: {uri}: refused to load")
    assert not marker.exists()


def test_a_locally_stored_artifact_changed_in_place_is_refused(tmp_path):
    ctx = ctx_at(str(tmp_path / "artifacts"))
    uri = run_stage("compile", ctx, compile_stage.Request(params="gpt2_tiny")).outputs["compile_cache"]
    report = tmp_path / "artifacts" / ctx.pipeline_run_id / "compile" / "compile_cache" / REPORT_FILE
    text = report.read_text()
    report.write_text(text.replace("false", "fals3"))  # same size: only the checksum tells
    with pytest.raises(StorageError, match=f"file {REPORT_FILE} does not match its sha256"):
        with vouched_input(uri, "compile_cache"):
            pass


def publish_checkpoints(ctx: RunContext, files: dict[str, bytes]) -> str:
    """A `checkpoints` artifact published and recorded the way a train stage does it."""
    uri = ctx.artifact_uri("train", "checkpoints")
    with tracking.stage_run("train", ctx) as tracked, local_output(uri) as out:
        for name, data in files.items():
            (out / name).write_bytes(data)
    tracking.record_published(tracked.run_id, {"checkpoints": (uri, manifest_digest(read_manifest(uri)))})
    return uri


def test_cerebras_checkpoints_are_vouched_for_by_the_stage_that_published_them(s3_root, tmp_path):
    ctx = ctx_at(s3_root)
    uri = publish_checkpoints(ctx, {"checkpoint_5.mdl": b"five", "checkpoint_10.mdl": b"ten"})
    local, sha = vouched_checkpoint(uri, tmp_path, suffix=".mdl")  # the folder: its newest
    assert local.read_bytes() == b"ten" and sha == sha256_file(local)
    local, sha = vouched_checkpoint(f"{uri}/checkpoint_5.mdl", tmp_path, suffix=".mdl")
    assert local.read_bytes() == b"five" and sha == sha256_file(local)

    # Republished by someone else (a new manifest, no MLflow record): refused.
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "checkpoint_10.mdl").write_bytes(b"runs code")
    upload_dir(forged, uri)
    with pytest.raises(UntrustedArtifactError, match="recorded publishing this checkpoints artifact"):
        vouched_checkpoint(f"{uri}/checkpoint_10.mdl", tmp_path, suffix=".mdl")
    # A file in no artifact at all: refused.
    stray = tmp_path / "checkpoint_3.mdl"
    stray.write_bytes(b"three")
    with pytest.raises(UntrustedArtifactError, match="it is in no artifact a gpt2ops stage published"):
        vouched_checkpoint(str(stray), tmp_path, suffix=".mdl")
