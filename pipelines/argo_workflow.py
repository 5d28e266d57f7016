"""The GPT-2 pre-training pipeline (``pipelines.definition``) rendered to Argo Workflows with Hera:
the WorkflowTemplate ``gpt2ops-pretrain`` and the CronWorkflow that retrains from it on a schedule.

    start-run -> download -> preprocess -> validate -> compile-<target> -> train-<target>
              -> evaluate -> promote -> record-results               (onExit: end-run)

- **Parameters**: the run form (``PipelineParameters``: name, default, description; ``target`` as an
  enum), plus ``memoize`` (``false``: run every stage again, as scheduled retraining does).
- **Tasks**: each step of the definition is a container template running ``gpt2ops <stage>`` in its
  target's image, with the step's inputs as input parameters and its command line made from them;
  the run context comes as flags (``--pipeline_run_id {{workflow.uid}}``, the artifact root, the
  MLflow experiment and the parent run ``start-run`` opened). The stage also writes its result to
  ``/scratch/result.json`` (``--result_file``), the task's output parameter ``result``; a later task
  reads an output from it with ``{{=jsonpath(tasks[...].outputs.parameters.result, '$.outputs.x')}}``.
  The compile and train steps exist once per target; ``when`` runs the run form's target's only, and
  a task after them reads ``tasks['train-' + workflow.parameters.target]``.
- **Bookkeeping**: ``start-run`` (``gpt2ops pipeline-run start``) opens the MLflow parent run and
  checks the run form before any data moves; ``record-results`` puts the outcome on it; the exit
  handler ``end-run`` closes it FINISHED or FAILED whatever happened (``{{workflow.status}}``,
  ``{{workflow.failures}}``).
- **Retries**: ``retryStrategy`` with exponential backoff (the definition's), policy ``Always`` so a
  lost or preempted pod (an Argo *Error*) is retried too, except a stage that exited 2 (a
  user-fixable gpt2ops error: it would fail the same way again). A retried train step resumes from
  the last checkpoint the lost attempt uploaded, as under KFP.
- **Time limits**: ``activeDeadlineSeconds`` per task (the definition's ``timeout_s``).
- **Memoization**: each cached step's outputs are memoized in the ConfigMap ``gpt2ops-memo-cache``,
  keyed on the step, its image and command, and its inputs (not the pipeline run id nor the parent
  run): an unchanged rerun skips the stages that finished, as KFP caching does. ``memoize=false``
  puts the workflow's uid into the keys.
- **Placement**: resources as defined; node selector, tolerations and GPU limits from the run form
  through ``podSpecPatch``; a memory-backed ``/dev/shm``; credentials only from the ``gpt2ops-s3``
  and ``gpt2ops-mlflow`` Secrets; a scratch ``emptyDir`` as working folder.
- **Multi-node training**: the gpu train task runs ``gpt2ops train --nproc_per_node N --num_nodes M``,
  the same launcher as everywhere (a Kubeflow Trainer TrainJob past one node).

Needs Argo Workflows >= 3.6 (``schedules``, ``Backoff.cap``, expr's ``concat``).
"""

from __future__ import annotations

import hashlib
import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hera.workflows import (DAG, Container, CronWorkflow, EmptyDirVolume, Parameter, RetryStrategy, Task,
                            WorkflowTemplate)
from hera.workflows import models as m

from gpt2core import flags
from gpt2core.images import image_for
from gpt2core.launch.trainjob import ENV_TRAINER_IMAGE, GPU_RESOURCE
from gpt2core.pipeline_parameters import PipelineParameters
from pipelines.definition import (BOOKKEEPING, BRANCH_STAGES, DESCRIPTION, MLFLOW_AUTH_KEYS, MLFLOW_SECRET,
                                  MLFLOW_SECRET_KEYS, PIPELINE_NAME, S3_SECRET, S3_SECRET_KEYS, START, STEPS,
                                  STAGES, TARGET_BRANCHES, Arg, Form, Input, JsonField, Output, Product, Scratch, StepSettings,
                                  Step, Value, step)

TEMPLATE_NAME = PIPELINE_NAME
ENTRYPOINT = "pretrain"
CRON_NAME = "gpt2ops-retrain"
SERVICE_ACCOUNT = "gpt2ops-pipeline-runner"  # k8s/base/rbac.yaml: the identity of pipeline pods, KFP or Argo
MEMO_CACHE = "gpt2ops-memo-cache"  # k8s/components/argo/memo-cache.yaml
MEMO_MAX_AGE = "720h"
ARTIFACT_REPOSITORY = m.ArtifactRepositoryRef(config_map="gpt2ops-artifact-repositories", key="s3")
MEMOIZE = "memoize"  # the workflow parameter that switches memoization off ("false")
ARGO_VERSION = ">= 3.6.0"

START_TASK, RECORD_TASK, END_TASK = "start-run", "record-results", "end-run"
RUN_ID = "{{workflow.uid}}"  # the pipeline run id: unique, kept by `argo retry`
SCRATCH = "/scratch"  # each pod's own emptyDir, its working folder
RESULT_FILE = f"{SCRATCH}/result.json"
PARENT_RUN_FILE = f"{SCRATCH}/parent_run_id"
CONTEXT = ("pipeline_run_id", "artifact_root", "experiment", "parent_run_id")
USER_ERROR_EXIT = 2  # gpt2ops exits 2 on an error the user must fix (gpt2core.cli): not retried

DEFAULT_SCHEDULE = "0 3 * * 0"  # Sundays 03:00
DEFAULT_TIMEZONE = "UTC"
STARTING_DEADLINE_S = 3600  # a run missed by more than this (controller down) is skipped
HISTORY_LIMIT = 3


# ---------------------------------------------------------------- parameters

def parameter_text(value: Any) -> str:
    """A run-form value as an Argo parameter value: dicts and lists as JSON, booleans lower-case."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _form_arguments() -> list[Parameter]:
    arguments = []
    for name, field in PipelineParameters.model_fields.items():
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
        arguments.append(Parameter(name=name, value=parameter_text(field.get_default(call_default_factory=True)),
                                   description=field.description, enum=list(choices) if choices else None))
    arguments.append(Parameter(name=MEMOIZE, value="true", enum=["true", "false"], description=(
        "false: run every stage again instead of reusing the outputs of an earlier run with the same inputs "
        "(scheduled retraining reads fresh data)")))
    return arguments


def _workflow_parameter(name: str) -> str:
    return f"{{{{workflow.parameters.{name}}}}}"


# ---------------------------------------------------------------- templates

def _env(settings: StepSettings) -> list[m.EnvVar]:
    def from_secret(secret: str, key: str, optional: bool = False) -> m.EnvVar:
        return m.EnvVar(name=key, value_from=m.EnvVarSource(secret_key_ref=m.SecretKeySelector(
            name=secret, key=key, optional=optional or None)))

    env = [from_secret(S3_SECRET, k) for k in S3_SECRET_KEYS]
    env += [from_secret(MLFLOW_SECRET, k) for k in MLFLOW_SECRET_KEYS]
    env += [from_secret(MLFLOW_SECRET, k, optional=True) for k in MLFLOW_AUTH_KEYS]
    if settings.trainer_image:  # what the TrainJob nodes the step may launch run
        env.append(m.EnvVar(name=ENV_TRAINER_IMAGE, value=image_for(settings.trainer_image)))
    return env


def _retry(settings: StepSettings) -> RetryStrategy | None:
    retry = settings.retry
    if retry is None:
        return None
    factor = int(retry.factor) if float(retry.factor).is_integer() else str(retry.factor)
    return RetryStrategy(
        limit=retry.limit, retry_policy="Always",
        expression=f"lastRetry.status == 'Error' || lastRetry.exitCode != '{USER_ERROR_EXIT}'",
        backoff=m.Backoff(duration=f"{retry.backoff_s}s", factor=factor, cap=f"{retry.max_backoff_s}s"))


def _pod_spec_patch(settings: StepSettings) -> str | None:
    """Node selector, tolerations and GPUs from the run form (JSON values), patched onto the pod."""
    placement = settings.placement
    if placement is None:
        return None
    if len(placement.tolerations) == 1:
        tolerations = _workflow_parameter(placement.tolerations[0])
    else:
        lists = ", ".join(f"fromJSON(workflow.parameters.{name})" for name in placement.tolerations)
        tolerations = f"{{{{=concat({lists})}}}}"
    patch = [f'"nodeSelector": {_workflow_parameter(placement.node_selector)}', f'"tolerations": {tolerations}']
    if placement.gpus:
        patch.append(f'"containers": [{{"name": "main", "resources": {{"limits": '
                     f'{{"{GPU_RESOURCE}": "{_workflow_parameter(placement.gpus)}"}}}}}}]')
    return "{" + ", ".join(patch) + "}"


def _container(name: str, settings: StepSettings, args: list[str], *, inputs: list[str] = (),
               outputs: Mapping[str, str] = {}, memoize_on: list[str] | None = None) -> Container:
    """A container template running ``gpt2ops ARGS`` with ``settings``; ``outputs``: output
    parameter -> file; ``memoize_on``: the inputs its memoization key is made of (None: not memoized)."""
    image = image_for(settings.image)
    volumes = [EmptyDirVolume(name="scratch", mount_path=SCRATCH)]
    if settings.placement:
        volumes.append(EmptyDirVolume(name="dshm", mount_path="/dev/shm", medium="Memory",
                                      size_limit=settings.placement.shm_size))
    memoize = None
    if memoize_on is not None and settings.cached:
        memoize = m.Memoize(key=_memo_key(name, image, args, memoize_on), max_age=MEMO_MAX_AGE,
                            cache=m.Cache(config_map=m.LocalObjectReference(name=MEMO_CACHE)))
    return Container(
        name=name, image=image, command=["gpt2ops"], args=args, working_dir=SCRATCH,
        inputs=[Parameter(name=n) for n in inputs] or None,
        outputs=[Parameter(name=n, value_from=m.ValueFrom(path=path)) for n, path in outputs.items()] or None,
        env=_env(settings), volumes=volumes,
        resources=m.ResourceRequirements(requests=dict(settings.resources.requests) or None,
                                         limits=dict(settings.resources.limits) or None),
        retry_strategy=_retry(settings), active_deadline_seconds=settings.timeout_s,
        pod_spec_patch=_pod_spec_patch(settings), memoize=memoize, labels=dict(settings.pod_labels) or None)


def _memo_key(name: str, image: str, args: list[str], inputs: list[str]) -> str:
    """``<template>-<sha256>`` of the template's image and command and the values of ``inputs``
    (Argo's cache keys are [a-zA-Z0-9-]); with memoize=false the workflow's uid joins them."""
    spec = hashlib.sha256(json.dumps([image, args]).encode()).hexdigest()[:16]
    values = ", ".join([f"'{spec}'", *(f"inputs.parameters.{n}" for n in inputs),
                        f"workflow.parameters.{MEMOIZE} == 'true' ? '' : workflow.uid"])
    return f"{{{{='{name}-' + sprig.sha256sum(toJson([{values}]))}}}}"


def _arg_value(value: Input | Product | JsonField | Scratch) -> str:
    if isinstance(value, Input):
        return f"{{{{inputs.parameters.{value.name}}}}}"
    if isinstance(value, Product):
        return f"{{{{=asInt(inputs.parameters.{value.left}) * asInt(inputs.parameters.{value.right})}}}}"
    if isinstance(value, JsonField):
        return f"{{{{=jsonpath(inputs.parameters.{value.name}, \"$['{value.key}']\")}}}}"
    return f"{SCRATCH}/{value.name}"


def _command(arguments: tuple[Arg, ...]) -> list[str]:
    return [part for arg in arguments for part in ((arg.flag,) if arg.flag else ()) + (_arg_value(arg.value),)]


def _stage_template(s: Step) -> Container:
    context = [part for name in CONTEXT for part in (f"--{name}", f"{{{{inputs.parameters.{name}}}}}")]
    args = [s.stage, *_command(s.command), *context, "--result_file", RESULT_FILE]
    return _container(s.name, s.settings, args, inputs=[*s.inputs, *CONTEXT], outputs={"result": RESULT_FILE},
                      memoize_on=[*s.inputs, "artifact_root", "experiment"])


def _start_template() -> Container:
    form = []
    for name in PipelineParameters.model_fields:
        value = _workflow_parameter(name)
        if name == "run_name":  # the parent run is named after the workflow unless named otherwise
            value = "{{=workflow.parameters.run_name == '' ? workflow.name : workflow.parameters.run_name}}"
        form += [flags.flag_for(PipelineParameters, name), value]
    return _container(START_TASK, START, ["pipeline-run", "start", "--pipeline_run_id", RUN_ID, *form,
                                          "--output_file", PARENT_RUN_FILE],
                      outputs={"parent_run_id": PARENT_RUN_FILE})


def _record_template() -> Container:
    results = [part for stage in STAGES for part in ("--result", f"{{{{inputs.parameters.{stage}}}}}")]
    return _container(RECORD_TASK, BOOKKEEPING, ["pipeline-run", "record", "--pipeline_run_id", RUN_ID,
                                                 "--experiment", _workflow_parameter("experiment"), *results],
                      inputs=list(STAGES))


def _end_template() -> Container:
    return _container(END_TASK, BOOKKEEPING, [
        "pipeline-run", "end", "--pipeline_run_id", RUN_ID, "--experiment", _workflow_parameter("experiment"),
        "--status", "{{workflow.status}}", "--failures", "{{workflow.failures}}"])


# ---------------------------------------------------------------- the DAG

def _task_ref(stage: str, target: str | None) -> str:
    """The task holding ``stage``'s result as seen from a step of branch ``target`` (None: outside)."""
    if stage not in BRANCH_STAGES:
        return f"tasks['{stage}']"
    if target:
        return f"tasks['{step(stage, target).name}']"
    return f"tasks['{stage}-' + workflow.parameters.target]"  # the chosen branch's step (Step.name)


def _result_of(stage: str) -> str:
    """The result of ``stage`` as a task after the branches reads it."""
    return f"{{{{={_task_ref(stage, None)}.outputs.parameters.result}}}}"


def _argument(value: Value, target: str | None) -> str:
    if isinstance(value, Form):
        return _workflow_parameter(value.name)
    if isinstance(value, Output):
        # every branch's step of a stage has the same outputs
        producer = step(value.stage, (target or TARGET_BRANCHES[0]) if value.stage in BRANCH_STAGES else None)
        path = producer.outputs[value.name]
        return f"{{{{=jsonpath({_task_ref(value.stage, target)}.outputs.parameters.result, \"{path}\")}}}}"
    return value


def _depends(s: Step) -> str:
    names = [START_TASK]
    for stage in s.upstream():
        if stage in BRANCH_STAGES:
            names += [step(stage, s.target).name] if s.target else [step(stage, t).name for t in TARGET_BRANCHES]
        else:
            names.append(stage)
    return " && ".join(dict.fromkeys(names))


def workflow_template() -> WorkflowTemplate:
    """The WorkflowTemplate ``gpt2ops-pretrain`` (images from ``gpt2core.images.image_for``)."""
    context = {"pipeline_run_id": RUN_ID, "artifact_root": _workflow_parameter("artifact_root"),
               "experiment": _workflow_parameter("experiment"),
               "parent_run_id": f"{{{{tasks.{START_TASK}.outputs.parameters.parent_run_id}}}}"}
    with WorkflowTemplate(
            name=TEMPLATE_NAME, entrypoint=ENTRYPOINT, on_exit=END_TASK, arguments=_form_arguments(),
            labels={"app.kubernetes.io/part-of": "gpt2ops"},
            annotations={"workflows.argoproj.io/description": DESCRIPTION,
                         "workflows.argoproj.io/version": ARGO_VERSION},
            service_account_name=SERVICE_ACCOUNT,
            security_context=m.PodSecurityContext(run_as_non_root=True, run_as_user=1000, run_as_group=0),
            artifact_repository_ref=ARTIFACT_REPOSITORY, archive_logs=True,
            pod_gc=m.PodGC(strategy="OnPodSuccess")) as template:
        stage_templates = {s.name: _stage_template(s) for s in STEPS}
        start, record = _start_template(), _record_template()
        _end_template()
        with DAG(name=ENTRYPOINT):
            Task(name=START_TASK, template=start)
            for s in STEPS:
                Task(name=s.name, template=stage_templates[s.name], depends=_depends(s),
                     when=f"'{{{{workflow.parameters.target}}}}' == '{s.target}'" if s.target else None,
                     arguments=[Parameter(name=n, value=_argument(v, s.target)) for n, v in s.inputs.items()]
                     + [Parameter(name=n, value=v) for n, v in context.items()])
            Task(name=RECORD_TASK, template=record, depends=STEPS[-1].name,
                 arguments=[Parameter(name=stage, value=_result_of(stage)) for stage in STAGES])
    return template


def cron_workflow(*, schedule: str = DEFAULT_SCHEDULE, timezone: str = DEFAULT_TIMEZONE,
                  arguments: Mapping[str, Any] | None = None, name: str = CRON_NAME) -> CronWorkflow:
    """A CronWorkflow that runs the WorkflowTemplate on ``schedule`` (5-field cron, in ``timezone``)
    with ``arguments`` (run-form values; the template's defaults for the others) and memoization off:
    each run reads fresh data. One run at a time (Forbid); promotion still needs a better model."""
    parameters = [Parameter(name=k, value=parameter_text(v)) for k, v in (arguments or {}).items()]
    return CronWorkflow(
        name=name, schedules=[schedule], timezone=timezone, concurrency_policy="Forbid",
        starting_deadline_seconds=STARTING_DEADLINE_S, successful_jobs_history_limit=HISTORY_LIMIT,
        failed_jobs_history_limit=HISTORY_LIMIT, labels={"app.kubernetes.io/part-of": "gpt2ops"},
        workflow_template_ref=m.WorkflowTemplateRef(name=TEMPLATE_NAME),
        arguments=[*parameters, Parameter(name=MEMOIZE, value="false")])


RENDERED = {"workflow-template.yaml": workflow_template, "cron-workflow.yaml": cron_workflow}


def manifest(obj: WorkflowTemplate | CronWorkflow) -> dict[str, Any]:
    """The object as the dict kubectl and the Argo server take."""
    return obj.to_dict()


def render(output_dir: str | Path) -> list[Path]:
    """Write the WorkflowTemplate and the (default) CronWorkflow as YAML into ``output_dir``."""
    import yaml

    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, build in RENDERED.items():
        path = folder / file_name
        header = ("# Rendered by `gpt2ops argo render` from pipelines/definition.py: do not edit "
                  "(tests/test_argo.py keeps it in sync).\n")
        path.write_text(header + yaml.safe_dump(manifest(build()), sort_keys=False, width=120))
        written.append(path)
    return written
