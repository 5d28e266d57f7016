"""`gpt2ops compare --experiment NAME`: MLflow runs side by side.

A table of the experiment's newest runs of one stage (default ``train``): key params, the params
that differ between the runs, and final metrics; plus one PNG overlaying their loss curves. Both
are printed / written to ``--output`` (a local folder or s3:// URI; default ``work/compare/NAME``).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import logging
from dataclasses import dataclass, field

from gpt2core.errors import ConfigError, TrackingError
from gpt2core.platform.artifacts import local_output
from gpt2core.platform.tracking import (TAG_CONFIG_HASH, TAG_PIPELINE_RUN, TAG_STAGE, curves_png,
                                        find_stage_runs, metric_histories)

log = logging.getLogger(__name__)

KEY_PARAMS = ("model.hidden_size", "model.num_hidden_layers", "model.num_heads", "train_input.max_sequence_length",
              "train_input.batch_size", "runconfig.max_steps")
FINAL_METRICS = ("train/loss", "eval/loss", "eval/lm_perplexity", "eval/accuracy", "train/tokens_per_s", "train/mfu")
MAX_DIFFERING_PARAMS = 8
CURVE_METRIC = "train/loss"
TABLE_FILE, CSV_FILE, PLOT_FILE = "comparison.md", "comparison.csv", "loss_curves.png"


@dataclass
class Comparison:
    columns: list[str]
    rows: list[dict[str, str]]
    curves: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(row.get(c, "") for c in self.columns) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(self.rows)
        return out.getvalue()


def _shown(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def compare_runs(experiment: str, *, stage: str = "train", max_runs: int = 20) -> Comparison:
    """The newest max_runs runs of `stage` in `experiment`, newest first."""
    runs = find_stage_runs(experiment, stage, max_runs=max_runs)
    if not runs:
        raise TrackingError(f"experiment {experiment!r} has no {stage} runs (runs are tagged {TAG_STAGE})")
    differing = sorted(k for k in set().union(*(r.data.params for r in runs))
                       if k not in KEY_PARAMS and len({r.data.params.get(k) for r in runs}) > 1)
    params = [*KEY_PARAMS, *differing[:MAX_DIFFERING_PARAMS]]
    metrics = [m for m in FINAL_METRICS if any(m in r.data.metrics for r in runs)]
    columns = ["run", "pipeline run", "status", "started", "config", *params, *metrics]
    rows, curves = [], {}
    for run in runs:
        name = f"{run.info.run_name} ({run.info.run_id[:8]})"
        started = datetime.datetime.fromtimestamp(run.info.start_time / 1000, datetime.timezone.utc)
        row = {"run": name, "pipeline run": run.data.tags.get(TAG_PIPELINE_RUN, ""), "status": run.info.status,
               "started": started.strftime("%Y-%m-%d %H:%M"), "config": run.data.tags.get(TAG_CONFIG_HASH, "")[:12]}
        row.update({p: run.data.params.get(p, "") for p in params})
        row.update({m: _shown(run.data.metrics[m]) if m in run.data.metrics else "" for m in metrics})
        rows.append(row)
        history = metric_histories(run.info.run_id, (CURVE_METRIC,))
        if CURVE_METRIC in history:
            curves[name] = history[CURVE_METRIC]
    if len(differing) > MAX_DIFFERING_PARAMS:
        log.info("%d more params differ between the runs: %s", len(differing) - MAX_DIFFERING_PARAMS,
                 ", ".join(differing[MAX_DIFFERING_PARAMS:]))
    return Comparison(columns=columns, rows=rows, curves=curves)


def write_comparison(comparison: Comparison, output: str, *, title: str) -> None:
    """Table (Markdown, CSV) and the overlaid loss curves (PNG) into the artifact at output."""
    with local_output(output) as out:
        (out / TABLE_FILE).write_text(f"# {title}\n\n{comparison.markdown()}")
        (out / CSV_FILE).write_text(comparison.csv())
        if comparison.curves:
            (out / PLOT_FILE).write_bytes(curves_png(comparison.curves, title=title, y_label=CURVE_METRIC))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--stage", default="train", help="which stage's runs to compare (default: train)")
    parser.add_argument("--max_runs", type=int, default=20, help="newest runs to show (default: 20)")
    parser.add_argument("--output", default=None,
                        help="folder or s3:// URI for the table and PNG (default: work/compare/<experiment>)")


def main(args: argparse.Namespace) -> int:
    if args.max_runs < 1:
        raise ConfigError(f"--max_runs: expected >= 1, got {args.max_runs}")
    comparison = compare_runs(args.experiment, stage=args.stage, max_runs=args.max_runs)
    output = args.output or f"work/compare/{args.experiment}"
    write_comparison(comparison, output, title=f"{args.experiment}: {args.stage} runs")
    print(comparison.markdown())
    print(f"table and loss curves ({len(comparison.curves)} runs): {output}")
    return 0
