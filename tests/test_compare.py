"""`gpt2ops compare`: runs of a real MLflow store side by side, curves into a PNG in real S3."""

from __future__ import annotations

import uuid

import pytest

from gpt2core.platform import artifacts as storage, tracking
from gpt2core.cli import main as cli
from gpt2core.errors import TrackingError
from gpt2core import compare
from gpt2core.platform.context import RunContext


@pytest.fixture
def experiment(s3_root) -> str:
    name = "compare-" + uuid.uuid4().hex[:8]
    for lr, losses in (("0.001", [5.0, 4.0, 3.5]), ("0.003", [5.0, 3.0, 2.0])):
        ctx = RunContext(pipeline_run_id="p-" + lr, artifact_root=s3_root, experiment=name)
        with tracking.stage_run("train", ctx, params={"model.hidden_size": 64, "optimizer.learning_rate": lr},
                                tags={tracking.TAG_CONFIG_HASH: "hash-" + lr}) as run:
            for step, loss in enumerate(losses, start=1):
                run.log_metrics({"train/loss": loss}, step=step)
            run.log_metrics({"eval/loss": losses[-1] + 0.1})
    with tracking.stage_run("evaluate", RunContext("p-x", s3_root, name)):
        pass  # another stage: not compared
    return name


def test_table_and_overlaid_curves(experiment, s3_root, capsys):
    comparison = compare.compare_runs(experiment)
    assert [row["pipeline run"] for row in comparison.rows] == ["p-0.003", "p-0.001"]  # newest first
    assert "optimizer.learning_rate" in comparison.columns  # it differs between the runs
    assert [row["eval/loss"] for row in comparison.rows] == ["2.1", "3.6"]
    assert [values for _, values in comparison.curves.values()] == [[5.0, 3.0, 2.0], [5.0, 4.0, 3.5]]
    out = f"{s3_root}/comparison"
    assert cli(["compare", "--experiment", experiment, "--output", out]) == 0
    printed = capsys.readouterr().out
    assert "| run | pipeline run |" in printed and "p-0.001" in printed
    assert storage.read_bytes(f"{out}/{compare.PLOT_FILE}").startswith(b"\x89PNG")
    assert "optimizer.learning_rate" in storage.read_text(f"{out}/{compare.CSV_FILE}").splitlines()[0]


def test_unknown_experiment_is_a_clear_error(capsys):
    with pytest.raises(TrackingError, match="no experiment named 'nope-"):
        compare.compare_runs("nope-" + uuid.uuid4().hex[:6])
    assert cli(["compare", "--experiment", "nope-x"]) == 2
    assert "no experiment named 'nope-x'" in capsys.readouterr().err
