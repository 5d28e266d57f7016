"""`gpt2ops run` (the whole pipeline on this machine through kfp.local) and
`gpt2ops pipeline compile | upload | submit | schedule` (against a Kubeflow Pipelines endpoint)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from gpt2core import flags
from gpt2core.errors import ConfigError, Gpt2opsError, ServiceError, one_line
from gpt2core.pipeline_parameters import PipelineParameters
from gpt2core.platform.context import ENV_RUN_ID, new_pipeline_run_id
from gpt2core.platform.settings import exported, reload_settings
from gpt2core.platform.work_folder import (RUNS_FOLDER, RunRecord, WorkFolder, WorkFolderLock, describe_holder,
                                           kill_processes, leftover_processes)
from gpt2core.stages.inputs import working_folder

PACKAGE_PATH = Path(__file__).with_name("gpt2_pipeline.yaml")
RUNNERS = ("subprocess", "docker")
LAST_RUN = "last"  # --resume without a run id
ENV_KFP_HOST = "KF_PIPELINES_ENDPOINT"


# ---------------------------------------------------------------- the pipeline's parameters as flags

def add_parameter_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per pipeline parameter (gpt2core.pipeline_parameters); unset flags keep the defaults."""
    flags.add_arguments(parser.add_argument_group("pipeline parameters (default: the pipeline's)"),
                        PipelineParameters)


def pipeline_arguments(args: argparse.Namespace, *, here: bool) -> dict[str, object]:
    """The pipeline parameters given as flags, checked before anything starts (a ConfigError names
    the parameter): the whole check for a run on this machine (``here``), the values alone for one
    sent to a cluster, whose nodes may hold files this machine has not."""
    arguments = {name: getattr(args, name) for name in PipelineParameters.model_fields if hasattr(args, name)}
    if "source" in arguments:  # the default file selection and checksum belong to the default source
        arguments.setdefault("source_include", "")
        arguments.setdefault("source_sha256", "")
    form = PipelineParameters(**arguments)
    if here:
        form.check()
    else:
        form.check_values()
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
                   help="local state: embedded S3 data, MLflow db, KFP outputs and cache, run records; "
                        "one run at a time")
    g.add_argument("--no_cache", action="store_true", help="rerun every step")
    g.add_argument("--resume", nargs="?", const=LAST_RUN, metavar="RUN_ID",
                   help="continue a killed or failed run of this work folder (the last one, or RUN_ID) "
                        "under its own pipeline run id, with its parameters: finished steps are reused, "
                        "training continues from its newest uploaded checkpoint, and it keeps its one "
                        "MLflow parent run")


def main_run(args: argparse.Namespace) -> int:
    given = pipeline_arguments(args, here=True)  # before anything starts or is written
    if args.resume and (given or args.no_cache):
        flags_given = [f"--{name}" for name in given] + ["--no_cache"] * args.no_cache
        raise ConfigError(f"--resume continues a run with the parameters and caching it was started "
                          f"with; leave out {', '.join(flags_given)}")
    work = WorkFolder(working_folder("--work_dir", args.work_dir))
    # Exported, so the steps (child processes) get them too; then re-read in this process.
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work.root / 'mlflow.db'}")
    if args.image:
        os.environ["GPT2OPS_IMAGE_CPU"] = args.image  # read when the components are imported
    reload_settings()

    with work.lock() as held, contextlib.ExitStack() as stack:
        record = _run_to_start(work, held, args.resume, given, shared_cache=not args.no_cache)
        # Every step (and what it starts) runs under this pipeline run id, in place of KFP's job id:
        # a resumed run keeps it, and a dead run's leftover processes are found by it.
        stack.enter_context(exported({ENV_RUN_ID: record.run_id}))
        _start_embedded_s3_if_needed(work, stack)
        started = time.monotonic()
        cache = work.root / "kfp-cache"
        try:
            run_locally(record.arguments, runner=args.runner, work_dir=work.root,
                        # --no_cache: nothing is served from the folder's cache, but the run keeps one
                        # of its own, so that a --resume of it reuses its finished steps
                        cache_root=cache if record.shared_cache else cache / f"run-{record.run_id}")
        except KeyboardInterrupt:
            end_dead_run(work, record.run_id, how="interrupted (Ctrl-C)")
            raise
        summary = run_summary(record.run_id, record.experiment, work_dir=work.root)
        summary["wall_s"] = round(time.monotonic() - started, 1)
        record.status = summary["status"]
        work.save_record(record)
        if record.status == "FINISHED" and not record.shared_cache:
            shutil.rmtree(cache / f"run-{record.run_id}", ignore_errors=True)
        print(format_summary(summary))
    return 0 if summary["status"] == "FINISHED" else 1


def _run_to_start(work: WorkFolder, held: WorkFolderLock, resume: str | None, given: dict[str, object], *,
                  shared_cache: bool) -> RunRecord:
    """The run this `gpt2ops run` runs, recorded in the folder and named on its lock: the one to
    resume, or a new one. What a dead run left (processes, RUNNING MLflow runs) is cleaned up first."""
    if held.dead_holder:
        dead = held.dead_holder.get("run_id")
        hint = f" (continue it with `gpt2ops run --resume {dead}`)" if dead and not resume else ""
        print(f"gpt2ops run: the last run in {work.root} died before it ended "
              f"({describe_holder(held.dead_holder)}); cleaning up after it{hint}", file=sys.stderr)
        end_dead_run(work, dead,
                     how=f"`gpt2ops run` ({describe_holder(held.dead_holder)}) died before it ended")
    if resume:
        record = work.record(None if resume == LAST_RUN else resume)
        if record.status == "FINISHED":
            raise ConfigError(f"--resume: run {record.run_id} ({record.run_name}, started "
                              f"{record.started_text}) finished; there is nothing to continue")
        end_dead_run(work, record.run_id, how="it was resumed while these runs were still open")
        print(f"gpt2ops run: resuming run {record.run_id} ({record.run_name}, started {record.started_text})",
              file=sys.stderr)
    else:
        given.setdefault("run_name", f"local-{time.strftime('%Y%m%d-%H%M%S')}")
        record = RunRecord(run_id=new_pipeline_run_id(), run_name=str(given["run_name"]),
                           experiment=PipelineParameters(**given).experiment, arguments=given,
                           shared_cache=shared_cache)
    record.status = "RUNNING"
    work.save_record(record)
    held.set_run(record.run_id)
    return record


def _start_embedded_s3_if_needed(work: WorkFolder, stack: contextlib.ExitStack) -> None:
    """With no S3 endpoint configured, serve the folder's own (SeaweedFS on its s3/ data) for the
    run; a server a dead run left on that data is stopped first (the folder is ours: we hold it)."""
    from gpt2core.platform import artifacts as storage

    if storage.s3_configured():
        return
    from gpt2core.platform.s3server import embedded_s3, stale_servers

    stale = stale_servers(work.root / "s3")
    if stale:
        print(f"gpt2ops run: stopping the embedded S3 server a dead run left on {work.root / 's3'} "
              f"(pid {', '.join(map(str, stale))})", file=sys.stderr)
        kill_processes(stale)
    stack.enter_context(embedded_s3(work.root / "s3"))


def end_dead_run(work: WorkFolder, run_id: str | None, *, how: str) -> None:
    """Clean up after a pipeline run of this folder that nothing runs any more: its processes still
    alive (steps of a killed `gpt2ops run`) are killed, and its MLflow runs left RUNNING are marked
    KILLED with ``how`` as the reason."""
    from gpt2core.platform import tracking

    if not run_id:
        return
    leftovers = leftover_processes(run_id)
    if leftovers:
        print(f"gpt2ops run: stopping {len(leftovers)} process(es) a dead run left in {work.root}: "
              f"pids {', '.join(map(str, leftovers))}", file=sys.stderr)
        kill_processes(leftovers)
    record = next((r for r in work.records() if r.run_id == run_id), None)
    experiment = record.experiment if record else PipelineParameters().experiment
    tracking.close_orphaned_runs(run_id, experiment, f"pipeline run {run_id}: {how}")


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


def run_locally(arguments: dict[str, object], *, runner: str, work_dir: Path, cache_root: Path) -> None:
    """Run the pipeline through kfp.local, its steps' outputs cached under cache_root; the outcome
    is read back from MLflow (run_summary)."""
    import warnings

    from kfp import local

    # Expected locally, once per step: resources and kfp-kubernetes settings apply on a cluster only,
    # and SubprocessRunner runs the steps in this venv rather than in their image.
    warnings.filterwarnings("ignore", message=r"Task .* have no effect in the current local runner")
    warnings.filterwarnings("ignore", message=r"You may be attemping to run a task that uses custom")
    local.init(runner=make_runner(runner, work_dir), pipeline_root=str(work_dir / "kfp"),
               enable_caching=True, cache_root=str(cache_root), raise_on_error=False)
    from pipelines.gpt2_pipeline import gpt2_pipeline  # after the image env is set

    # Locally a failure is shown at once: the cluster's retries (minutes of backoff) are dropped.
    spec = gpt2_pipeline.pipeline_spec
    for dag in [spec.root.dag, *(c.dag for c in spec.components.values())]:
        for task in dag.tasks.values():
            task.ClearField("retry_policy")
    gpt2_pipeline(**arguments)


def run_summary(pipeline_run_id: str, experiment: str, *, work_dir: Path) -> dict[str, object]:
    """What a run left behind, from its MLflow parent run: status, artifacts, metrics, samples, and
    the train run's loss curve (its MLflow artifact, and a local copy beside the run's record,
    ``work_dir/runs/<pipeline run id>/loss_curve.png``: the embedded S3 store holding the artifact
    stops with ``gpt2ops run``)."""
    from gpt2core.platform import tracking
    from gpt2core.platform.tracking.connection import redacted

    parent = tracking.find_pipeline_run(pipeline_run_id, experiment)
    if parent is None:
        raise Gpt2opsError(f"pipeline run {pipeline_run_id} left no MLflow parent run in experiment "
                           f"{experiment!r}; see the step logs above")
    artifacts = parent.artifacts
    loss_curve = {}
    train_run = parent.stage_runs.get("train")  # none when the train step was served from the cache
    png = tracking.loss_curve_png(train_run) if train_run else None
    if png:
        local = work_dir / RUNS_FOLDER / pipeline_run_id / "loss_curve.png"
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

        try:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            print(compile_pipeline(args.output))
        except OSError as exc:
            raise ConfigError(f"--output {args.output}: cannot write there ({exc.strerror})") from None
        return 0
    if not args.host:
        raise ConfigError(f"--host: no KFP endpoint given (pass --host or set {ENV_KFP_HOST})")
    if not Path(args.package).exists():
        raise ConfigError(f"--package: {args.package} does not exist "
                          f"(write it with `gpt2ops pipeline compile --output {args.package}`)")
    # Everything that needs no endpoint is checked before connecting.
    cron = kfp_cron(args.cron) if args.action == "schedule" else None
    if args.action == "schedule" and args.max_concurrency < 1:
        raise ConfigError(f"--max_concurrency: expected >= 1, got {args.max_concurrency}")
    arguments = pipeline_arguments(args, here=False) if args.action != "upload" else {}
    endpoint = KfpEndpoint(args.host)
    client = endpoint.client(args.namespace)
    if args.action == "upload":
        with endpoint.errors("upload the pipeline"):
            if args.version:
                made = client.upload_pipeline_version(args.package, args.version, pipeline_name=args.name)
                print(f"uploaded pipeline {args.name!r} version {args.version!r}: {made.pipeline_version_id}")
            else:
                made = client.upload_pipeline(args.package, pipeline_name=args.name)
                print(f"uploaded pipeline {args.name!r}: {made.pipeline_id}")
        return 0
    with endpoint.errors(f"open experiment {args.kfp_experiment!r}"):
        experiment = client.create_experiment(args.kfp_experiment, namespace=args.namespace)
    if args.action == "submit":
        with endpoint.errors("start the run"):
            run = client.run_pipeline(
                experiment_id=experiment.experiment_id,
                job_name=args.job_name or f"gpt2ops-{time.strftime('%Y%m%d-%H%M%S')}",
                pipeline_package_path=args.package, params=arguments,
                enable_caching=not args.no_cache)
        print(f"started run {run.run_id}")
        return 0
    # Scheduled retraining reads fresh data each time, so nothing is served from the cache.
    with endpoint.errors("create the recurring run"):
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


class KfpEndpoint:
    """The KFP API at ``host`` (``--host`` or $KF_PIPELINES_ENDPOINT; without a scheme https://, as
    kfp.Client takes it). Every failure to reach it or every call it refuses is one ServiceError line
    naming the endpoint and where it was set; kfp's own waits are skipped (it retries a refused
    health check five times, 5 s apart, each with a logged traceback)."""

    def __init__(self, host: str):
        self.url = host if "://" in host else f"https://{host}"
        self.source = ENV_KFP_HOST if host == os.environ.get(ENV_KFP_HOST) else "--host"

    def client(self, namespace: str | None):  # noqa: ANN201 - a kfp.Client
        """A kfp.Client, after the API's health endpoint answered the credentials kfp.Client sends
        (the cookie or header of the kfp context, ~/.config/kfp/context.json)."""
        import requests

        context = Path.home() / ".config" / "kfp" / "context.json"
        auth = json.loads(context.read_text()) if context.is_file() else {}
        header = auth.get("client_authentication_header_name")
        headers = {header: auth.get("client_authentication_header_value") or ""} if header else {}
        if auth.get("client_authentication_cookie"):
            headers["Cookie"] = auth["client_authentication_cookie"]
        try:
            answer = requests.get(f"{self.url.rstrip('/')}/apis/v2beta1/healthz", headers=headers, timeout=10)
        except requests.RequestException as exc:
            raise ServiceError(f"KFP API at {self.url} (from {self.source}) is unreachable "
                               f"({type(exc).__name__}: {one_line(exc, 200)})") from None
        if answer.status_code in (401, 403):
            raise ServiceError(f"KFP API at {self.url} (from {self.source}) refused the request (HTTP "
                               f"{answer.status_code}); check the credentials of the kfp context "
                               f"(~/.config/kfp/context.json) or the cookie/token your KFP needs")
        if answer.status_code >= 400:
            raise ServiceError(f"KFP API at {self.url} (from {self.source}) answered HTTP {answer.status_code} "
                               f"at /apis/v2beta1/healthz; expected a Kubeflow Pipelines v2 API endpoint")
        import kfp

        with self.errors("connect"):
            return kfp.Client(host=self.url, namespace=namespace or "kubeflow")

    @contextlib.contextmanager
    def errors(self, action: str) -> Iterator[None]:
        """A failed call to the API as one ServiceError line."""
        try:
            yield
        except Gpt2opsError:
            raise
        except Exception as exc:  # noqa: BLE001 - kfp_server_api, urllib3 and kfp errors alike
            status = getattr(exc, "status", None)
            detail = (f"HTTP {status} {getattr(exc, 'reason', '')}: {one_line(getattr(exc, 'body', ''), 200)}"
                      if status else f"{type(exc).__name__}: {one_line(exc, 200)}")
            raise ServiceError(f"KFP API at {self.url} (from {self.source}): could not {action}: {detail}") from None
