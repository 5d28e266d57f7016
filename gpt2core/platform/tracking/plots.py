"""Charts, drawn by matplotlib only, as PNG bytes: the loss curves of a run (logged to MLflow as
``plots/loss_curve.png`` and embedded in the KFP train step's HTML, the same bytes both places) and
the overlaid curves of ``gpt2ops compare``."""

from __future__ import annotations

import io
from collections.abc import Mapping

from gpt2core.platform.tracking.connection import mlflow_client, tracking_errors
from gpt2core.platform.tracking.queries import metric_histories
from gpt2core.platform.tracking.tags import TAG_PIPELINE_RUN, TAG_STAGE

LOSS_CURVE_FILE = "plots/loss_curve.png"
LOSS_METRICS = ("train/loss", "eval/loss")
_DPI = 120

Curves = Mapping[str, tuple[list[float], list[float]]]  # label -> (steps, values)


def curves_png(curves: Curves, *, title: str, x_label: str = "step", y_label: str = "loss") -> bytes:
    """One PNG (8 x 4.5 in at 120 dpi) overlaying labelled (steps, values) curves."""
    import matplotlib

    matplotlib.use("Agg")  # headless: containers and CI have no display
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(8, 4.5))
    try:
        for label, (steps, values) in curves.items():
            ax.plot(steps, values, label=label, marker="." if len(steps) < 50 else None)
        ax.set_title(title)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
        ax.legend()
        figure.tight_layout()
        out = io.BytesIO()
        figure.savefig(out, format="png", dpi=_DPI)
    finally:
        plt.close(figure)
    return out.getvalue()


def loss_curve_artifact_uri(run_id: str) -> str:
    """Where the run's ``plots/loss_curve.png`` artifact (``StageRun.log_loss_curve``) is stored."""
    with tracking_errors(f"read run {run_id}"):
        return f"{mlflow_client().get_run(run_id).info.artifact_uri}/{LOSS_CURVE_FILE}"


def loss_curve_png(run_id: str) -> bytes | None:
    """The run's logged loss histories (``train/loss``, ``eval/loss``) as one PNG titled
    ``<stage> loss (<pipeline run id>)``; None when the run logged neither."""
    curves = metric_histories(run_id, LOSS_METRICS)
    if not curves:
        return None
    with tracking_errors(f"read run {run_id}"):
        tags = mlflow_client().get_run(run_id).data.tags
    stage, pipeline_run_id = tags.get(TAG_STAGE, "run"), tags.get(TAG_PIPELINE_RUN, run_id)
    return curves_png(curves, title=f"{stage} loss ({pipeline_run_id})")
