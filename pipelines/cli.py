"""`gpt2ops run` (the whole pipeline on this machine through kfp.local) and
`gpt2ops pipeline compile | upload | submit | schedule` (against a Kubeflow Pipelines endpoint)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

from gpt2core import flags
from gpt2core.errors import ConfigError, Gpt2opsError
from gpt2core.pipeline_parameters import PipelineParameters
from gpt2core.platform.settings import reload_settings

PACKAGE_PATH = Path(__file__).with_name("gpt2_pipeline.yaml")
RUNNERS = ("subprocess", "docker")
ENV_KFP_HOST = "KF_PIPELINES_ENDPOINT"


# ---------------------------------------------------------------- the pipeline's parameters as flags

def add_parameter_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per pipeline parameter (gpt2core.pipeline_parameters); unset flags keep the defaults."""
    flags.add_arguments(parser.add_argument_group("pipeline parameters (default: the pipeline's)"),
                        PipelineParameters)


def pipeline_arguments(args: argparse.Namespace) -> dict[str, object]:
    """The pipeline parameters given as flags, type-checked (a ConfigError names the parameter)."""
    arguments = {name: getattr(args, name) for name in PipelineParameters.model_fields if hasattr(args, name)}
    if "source" in arguments:  # the default file selection and checksum belong to the default source
        arguments.setdefault("source_include", "")
        arguments.setdefault("source_sha256", "")
    PipelineParameters(**arguments)
    return arguments


# ---------------------------------------------------------------- gpt2ops run

def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add_parameter_arguments(parser)
    g = parser.add_argument_group("local run")
    g.add_argument("--runner", choices=RUNNERS, default="subprocess",
                   help="subprocess: steps run as processes of this venv; docker: in the "
                        "gpt2ops-cpu image (kfp.local.DockerRunner)")
    g.add_argument("--image", help="image for --runner docker (default: gpt2core.images)")
    g.add_argument("--work_dir", default="work",
                   help="local state: embedded S3 data, MLflow db, KFP outputs and cache")
    g.add_argument("--no_cache", action="store_true", help="rerun every step")


def main_run(args: argparse.Namespace) -> int:
    work_dir = Path(args.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    # Exported, so the steps (child processes) get them too; then re-read in this process.
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work_dir / 'mlflow.db'}")
    if args.image:
        os.environ["GPT2OPS_IMAGE_CPU"] = args.image  # read when the components are imported
    reload_settings()
    arguments = pipeline_arguments(args)
    arguments.setdefault("run_name", f"local-{time.strftime('%Y%m%d-%H%M%S')}")

    with contextlib.ExitStack() as stack:
        from gpt2core.platform import artifacts as storage

        if not storage.s3_configured():
            from gpt2core.platform.s3server import embedded_s3

            stack.enter_context(embedded_s3(work_dir / "s3"))
        started = time.monotonic()
        run_locally(arguments, runner=args.runner, work_dir=work_dir, cache=not args.no_cache)
        summary = run_summary(arguments["run_name"], PipelineParameters(**arguments).experiment,
                              work_dir=work_dir)
        summary["wall_s"] = round(time.monotonic() - started, 1)
        print(format_summary(summary))
    return 0 if summary["status"] == "FINISHED" else 1


def make_runner(runner: str, work_dir: Path):
    from kfp import local

    if runner == "subprocess":
        # The steps import gpt2core from this very environment; nothing gets pip-installed.
        return local.SubprocessRunner(use_venv=False)
    import docker.types

    from gpt2core.images import image_for, require_image

    # Stop before the first step, with the build command, when the image is not there (kfp.local
    # would try to pull a tag that only exists locally and fail with a registry error) or was built
    # from older sources than this checkout's (the steps would run old code).
    require_image(image_for("cpu"), "cpu", current=True)
    # Host networking reaches the embedded S3 server on 127.0.0.1; the work folder is mounted at
    # the same path so the sqlite MLflow store resolves inside the container too.
    forwarded = {k: v for k, v in os.environ.items()
                 if k.startswith(("AWS_", "MLFLOW_", "GPT2OPS_"))}
    return local.DockerRunner(
        network_mode="host",
        # The steps run as the caller, so what they write into work_dir is the caller's; HOME=/tmp
        # because the image's home belongs to its own user (uid 1000).
        user=f"{os.getuid()}:{os.getgid()}", environment={**forwarded, "HOME": "/tmp"},
        mounts=[docker.types.Mount(target=str(work_dir), source=str(work_dir), type="bind")])


def run_locally(arguments: dict[str, object], *, runner: str, work_dir: Path, cache: bool) -> None:
    """Run the pipeline through kfp.local; the outcome is read back from MLflow (run_summary)."""
    import warnings

    from kfp import local

    # Expected locally, once per step: resources and kfp-kubernetes settings apply on a cluster only,
    # and SubprocessRunner runs the steps in this venv rather than in their image.
    warnings.filterwarnings("ignore", message=r"Task .* have no effect in the current local runner")
    warnings.filterwarnings("ignore", message=r"You may be attemping to run a task that uses custom")
    local.init(runner=make_runner(runner, work_dir), pipeline_root=str(work_dir / "kfp"),
               enable_caching=cache, cache_root=str(work_dir / "kfp-cache"), raise_on_error=False)
    from pipelines.gpt2_pipeline import gpt2_pipeline  # after the image env is set

    # Locally a failure is shown at once: the cluster's retries (minutes of backoff) are dropped.
    spec = gpt2_pipeline.pipeline_spec
    for dag in [spec.root.dag, *(c.dag for c in spec.components.values())]:
        for task in dag.tasks.values():
            task.ClearField("retry_policy")
    gpt2_pipeline(**arguments)


def run_summary(run_name: str, experiment: str, *, work_dir: Path) -> dict[str, object]:
    """What a run left behind, from its MLflow parent run: status, artifacts, metrics, samples, and
    the train run's loss curve (its MLflow artifact, and a local copy under ``work_dir/runs/<run name>``:
    the embedded S3 store holding the artifact stops with ``gpt2ops run``)."""
    from gpt2core.platform import tracking
    from gpt2core.platform.tracking.connection import redacted

    parent = tracking.find_pipeline_run_named(run_name, experiment)
    if parent is None:
        raise Gpt2opsError(f"the pipeline left no MLflow parent run named {run_name!r} in "
                           f"experiment {experiment!r}; see the step logs above")
    artifacts = parent.artifacts
    loss_curve = {}
    train_run = parent.stage_runs.get("train")  # none when the train step was served from the cache
    png = tracking.loss_curve_png(train_run) if train_run else None
    if png:
        local = work_dir / "runs" / run_name / "loss_curve.png"
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(png)  # the artifact's very bytes (tracking.loss_curve_png draws both)
        loss_curve = {"png": str(local), "artifact": tracking.loss_curve_artifact_uri(train_run)}
    return {
        "status": parent.status,
        "error": parent.error,
        "experiment": experiment,
        "mlflow_page": tracking.runs_page(parent.experiment_id, parent.pipeline_run_id),
        "parent_run_id": parent.run_id,
        "stage_runs": parent.stage_runs,
        "artifacts": artifacts,
        "metrics": {k: v for k, v in sorted(parent.metrics.items()) if k.startswith("eval/")},
        "model_version": parent.model_version,
        "promoted": parent.promoted,
        "samples": read_samples(artifacts["evaluate/report"]) if "evaluate/report" in artifacts else [],
        "loss_curve": loss_curve,
        "tracking_uri": redacted(tracking.tracking_uri()),  # printed: no credentials
    }


def read_samples(report_uri: str) -> list[str]:
    """Generated texts (prompt + completion) from the evaluation report's samples.json."""
    from gpt2core.platform.artifacts import local_input

    with local_input(report_uri) as folder:
        samples = Path(folder) / "samples.json"
        if not samples.exists():
            return []
        return [s["prompt"] + s["completion"] for s in json.loads(samples.read_text())]


def format_summary(summary: dict[str, object]) -> str:
    lines = [f"\npipeline run: {summary['status']} in {summary['wall_s']} s  "
             f"(MLflow experiment {summary['experiment']!r}, parent run {summary['parent_run_id']})"]
    if summary["error"]:
        lines.append(f"error: {summary['error']}")
    if summary["stage_runs"]:
        lines.append("stage runs (stages served from the cache logged under an earlier run):")
        lines += [f"  {name:<12} {run_id}" for name, run_id in sorted(summary["stage_runs"].items())]
    if summary["artifacts"]:
        lines.append("artifacts:")
        lines += [f"  {name:<24} {uri}" for name, uri in summary["artifacts"].items()]
    if summary["metrics"]:
        shown = (f"{k} = {v:,.0f}" if float(v).is_integer() else f"{k} = {v:.4g}"  # counts whole
                 for k, v in summary["metrics"].items())
        lines.append("evaluation: " + ", ".join(shown))
    if summary["model_version"]:
        lines.append(f"registered model version {summary['model_version']}: "
                     + ("promoted to champion" if summary["promoted"] else "champion kept"))
    for sample in summary["samples"][:1]:
        lines.append(f"sample: {sample!r}")
    if summary["loss_curve"]:
        lines.append(f"loss curve: {summary['loss_curve']['png']}  "
                     f"(MLflow artifact {summary['loss_curve']['artifact']})")
    page = summary["mlflow_page"]  # this run's stage runs with their datasets; a run's page has its charts
    if str(summary["tracking_uri"]).startswith(("http://", "https://")):
        lines.append(f"MLflow UI: {str(summary['tracking_uri']).rstrip('/')}/{page}")
    else:
        lines.append(f"MLflow UI: mlflow ui --backend-store-uri {summary['tracking_uri']}  "
                     f"then open http://127.0.0.1:5000/{page}")
    return "\n".join(lines)


# ---------------------------------------------------------------- gpt2ops pipeline ...

def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("compile", help="write the pipeline spec YAML")
    p.add_argument("--output", default=str(PACKAGE_PATH), help=f"default: {PACKAGE_PATH}")

    def endpoint(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default=os.environ.get(ENV_KFP_HOST),
                       help=f"KFP API endpoint (env {ENV_KFP_HOST})")
        p.add_argument("--namespace", help="user namespace of a multi-user KFP (default: none)")
        p.add_argument("--package", default=str(PACKAGE_PATH),
                       help="compiled pipeline YAML to send (default: the committed one)")

    p = sub.add_parser("upload", help="upload the pipeline, or a new version of it")
    endpoint(p)
    p.add_argument("--name", default="gpt2ops-pretrain", help="pipeline name in the KFP UI")
    p.add_argument("--version", help="upload as a new version with this name")

    for action, help_text in (("submit", "start a run"),
                              ("schedule", "create a recurring run (scheduled retraining)")):
        p = sub.add_parser(action, help=help_text)
        endpoint(p)
        add_parameter_arguments(p)
        p.add_argument("--kfp_experiment", default="gpt2ops", help="KFP experiment name")
        p.add_argument("--job_name", help="KFP run / recurring run name")
        if action == "schedule":
            p.add_argument("--cron", required=True,
                           help='when to retrain, cron with 5 or 6 fields (6: seconds first), '
                                'e.g. "0 3 * * 0" = Sundays 03:00')
            p.add_argument("--max_concurrency", type=int, default=1)
        else:
            p.add_argument("--no_cache", action="store_true", help="rerun every step")


def main_pipeline(args: argparse.Namespace) -> int:
    if args.action == "compile":
        from pipelines.gpt2_pipeline import compile_pipeline

        print(compile_pipeline(args.output))
        return 0
    if not args.host:
        raise ConfigError(f"--host: no KFP endpoint given (pass --host or set {ENV_KFP_HOST})")
    if not Path(args.package).exists():
        raise ConfigError(f"--package: {args.package} does not exist "
                          f"(write it with `gpt2ops pipeline compile --output {args.package}`)")
    cron = kfp_cron(args.cron) if args.action == "schedule" else None  # fail before connecting
    client = kfp_client(args.host, args.namespace)
    if args.action == "upload":
        if args.version:
            made = client.upload_pipeline_version(args.package, args.version,
                                                  pipeline_name=args.name)
            print(f"uploaded pipeline {args.name!r} version {args.version!r}: "
                  f"{made.pipeline_version_id}")
        else:
            made = client.upload_pipeline(args.package, pipeline_name=args.name)
            print(f"uploaded pipeline {args.name!r}: {made.pipeline_id}")
        return 0
    arguments = pipeline_arguments(args)
    experiment = client.create_experiment(args.kfp_experiment, namespace=args.namespace)
    if args.action == "submit":
        run = client.run_pipeline(
            experiment_id=experiment.experiment_id,
            job_name=args.job_name or f"gpt2ops-{time.strftime('%Y%m%d-%H%M%S')}",
            pipeline_package_path=args.package, params=arguments,
            enable_caching=not args.no_cache)
        print(f"started run {run.run_id}")
        return 0
    # Scheduled retraining reads fresh data each time, so nothing is served from the cache.
    recurring = client.create_recurring_run(
        experiment_id=experiment.experiment_id,
        job_name=args.job_name or "gpt2ops-retrain",
        cron_expression=cron, max_concurrency=args.max_concurrency,
        no_catchup=True, params=arguments, pipeline_package_path=args.package,
        enable_caching=False)
    print(f"created recurring run {recurring.recurring_run_id} ({cron})")
    return 0


def kfp_cron(expression: str) -> str:
    """KFP schedules take 6-field cron (seconds first); accept the usual 5 fields too."""
    fields = expression.split()
    if len(fields) == 5:
        return " ".join(["0", *fields])
    if len(fields) == 6:
        return " ".join(fields)
    raise ConfigError(f"--cron: expected 5 or 6 space-separated fields, got {expression!r}")


def kfp_client(host: str, namespace: str):
    import kfp

    return kfp.Client(host=host, namespace=namespace or "kubeflow")
