"""The GPT-2 pre-training pipeline (``pipelines.definition``) rendered to Kubeflow Pipelines (KFP v2):

    start_run -> download -> preprocess -> validate -> [gpu | cerebras | cpu: compile -> train]
              -> evaluate -> promote -> record_results            (exit handler: end_run)

Each step of the definition is its stage's component (``COMPONENTS``) called with the step's inputs,
its settings applied by ``pipelines.kubernetes.configure``; the branches are dsl.If / Elif / Else on
the run form's target, and a branch output read after them is their dsl.OneOf.

Every stage writes its artifacts to `<artifact_root>/<kfp-run-id>/<stage>/<artifact>/` and logs an
MLflow child run under the parent run that start_run opens; end_run closes the parent FINISHED or
FAILED whatever happened inside. The stages are cached on their inputs, which leave out the MLflow
parent run id on purpose (see components/kfp_io.py), so a rerun with the same parameters reuses the
earlier artifacts.
"""

from kfp import dsl

from components.compile.component import compile_model
from components.download.component import download
from components.evaluate.component import evaluate
from components.pipeline_run.component import end_run, record_results, start_run
from components.preprocess.component import preprocess
from components.promote.component import promote
from components.train.component import train
from components.validate.component import validate
from gpt2core.pipeline_parameters import PipelineParameters
from pipelines import kubernetes as k8s
from pipelines.definition import (BOOKKEEPING, BRANCH_STAGES, DESCRIPTION, PIPELINE_NAME, START, STEPS,
                                  TARGET_BRANCHES, Form, Output, Step, step)
from pipelines.signature import kfp_signature

COMPONENTS = {"download": download, "preprocess": preprocess, "validate": validate, "compile": compile_model,
              "train": train, "evaluate": evaluate, "promote": promote}


def _pipeline(*values):
    """Pre-train a GPT-2 model: download, preprocess, validate, compile, train, evaluate, promote.

    Its parameters are gpt2core.pipeline_parameters.PipelineParameters (see kfp_signature).
    """
    form = dict(zip(PipelineParameters.model_fields, values))
    experiment = form["experiment"]
    run_ids = dict(pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, artifact_root=form["artifact_root"],
                   experiment=experiment)

    closing = end_run(pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, experiment=experiment)
    k8s.configure(closing, BOOKKEEPING, form)
    with dsl.ExitHandler(closing, name="gpt2-pretrain"):
        opened = start_run(params=form["params"], source=form["source"], target=form["target"],
                           num_gpus=form["num_gpus"], num_nodes=form["num_nodes"], gpu_type=form["gpu_type"],
                           max_steps=form["max_steps"], run_name=form["run_name"], **run_ids)
        k8s.configure(opened, START, form)
        outputs = _stages(form, run_ids, opened)
        recorded = record_results(
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, experiment=experiment,
            corpus_uri=outputs["download", "corpus_uri"], dataset_uri=outputs["preprocess", "dataset_uri"],
            validation_report_uri=outputs["validate", "report_uri"],
            compile_cache_uri=outputs["compile", "compile_cache_uri"], model_uri=outputs["train", "model_uri"],
            checkpoints_uri=outputs["train", "checkpoints_uri"],
            eval_report_uri=outputs["evaluate", "report_uri"],
            eval_metrics_json=outputs["evaluate", "metrics_json"],
            model_version=outputs["promote", "model_version"],
            promoted=outputs["promote", "promoted"],
        )
        k8s.configure(recorded, BOOKKEEPING, form)


def _stages(form: dict, run_ids: dict, opened) -> dict[tuple[str, str], object]:
    """Every step as a task, in the definition's order; returns (stage, output) -> its value as
    read outside the branches."""
    tasks: dict[str, dsl.PipelineTask] = {}
    outputs: dict[tuple[str, str], object] = {}

    def value(v: object, target: str | None) -> object:
        if isinstance(v, Form):
            return form[v.name]
        if isinstance(v, Output):
            if v.stage in BRANCH_STAGES and target:  # the same branch's step
                return tasks[step(v.stage, target).name].outputs[v.name]
            return outputs[v.stage, v.name]
        return v

    def add(s: Step) -> None:
        task = COMPONENTS[s.stage](**{name: value(v, s.target) for name, v in s.inputs.items()}, **run_ids)
        for stage in s.after:
            task.after(tasks[stage])
        if not s.upstream():
            task.after(opened)
        k8s.configure(task, s.settings, form)
        tasks[s.name] = task
        outputs.update({(s.stage, name): task.outputs[name] for name in s.outputs if not s.target})

    for s in (s for s in STEPS if not s.target and not _after_branches(s)):
        add(s)
    for i, target in enumerate(TARGET_BRANCHES):
        name = f"target-{target}"
        condition = (dsl.If(form["target"] == target, name=name) if i == 0 else
                     dsl.Else(name=name) if i == len(TARGET_BRANCHES) - 1 else
                     dsl.Elif(form["target"] == target, name=name))
        with condition:
            for s in STEPS:
                if s.target == target:
                    add(s)
    for stage in BRANCH_STAGES:
        for name in step(stage, TARGET_BRANCHES[0]).outputs:
            outputs[stage, name] = dsl.OneOf(*(tasks[step(stage, t).name].outputs[name] for t in TARGET_BRANCHES))
    for s in (s for s in STEPS if not s.target and _after_branches(s)):
        add(s)
    return outputs


def _after_branches(s: Step) -> bool:
    """Whether a step outside the branches comes after them in the definition's order."""
    first_branch = next(i for i, candidate in enumerate(STEPS) if candidate.target)
    return STEPS.index(s) > first_branch


gpt2_pipeline = dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)(
    kfp_signature(_pipeline, PipelineParameters))


def compile_pipeline(package_path: str) -> str:
    """Write the pipeline spec (YAML) to `package_path`."""
    from kfp import compiler

    compiler.Compiler().compile(gpt2_pipeline, package_path=package_path)
    return package_path
