"""The GPT-2 pre-training pipeline (KFP v2):

    start_run -> download -> preprocess -> validate -> [gpu | cerebras | cpu: compile -> train]
              -> evaluate -> promote -> record_results            (exit handler: end_run)

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
from gpt2core.images import image_for
from gpt2core.launch.trainjob import ENV_TRAINER_IMAGE
from gpt2core.pipeline_parameters import PipelineParameters
from pipelines import kubernetes as k8s
from pipelines.signature import kfp_signature

PIPELINE_NAME = "gpt2ops-pretrain"


def _compile_and_train(*, params, dataset_uri, max_steps, target, num_gpus, num_nodes, run_ids):
    compiled = compile_model(params=params, dataset_uri=dataset_uri, max_steps=max_steps,
                             target=target, **run_ids)
    trained = train(params=params, dataset_uri=dataset_uri, max_steps=max_steps, target=target,
                    num_gpus=num_gpus, num_nodes=num_nodes,
                    compile_cache_uri=compiled.outputs["compile_cache_uri"], **run_ids)
    return compiled, trained


def _pipeline(*values):
    """Pre-train a GPT-2 model: download, preprocess, validate, compile, train, evaluate, promote.

    Its parameters are gpt2core.pipeline_parameters.PipelineParameters (see kfp_signature).
    """
    form = dict(zip(PipelineParameters.model_fields, values))
    params, source, target, max_steps = form["params"], form["source"], form["target"], form["max_steps"]
    num_gpus, num_nodes, experiment = form["num_gpus"], form["num_nodes"], form["experiment"]
    tolerations = form["tolerations"]
    run_ids = dict(pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, artifact_root=form["artifact_root"],
                   experiment=experiment)
    heavy = dict(node_selector=form["node_selector"], tolerations=tolerations)

    closing = end_run(pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, experiment=experiment)
    k8s.bookkeeping(closing)
    with dsl.ExitHandler(closing, name="gpt2-pretrain"):
        opened = start_run(params=params, source=source, target=target, num_gpus=num_gpus,
                           num_nodes=num_nodes, gpu_type=form["gpu_type"], max_steps=max_steps,
                           run_name=form["run_name"], **run_ids)
        k8s.bookkeeping(opened, retry=False)  # it fails on bad run-form values: fail at once

        fetched = download(source=source, include=form["source_include"], sha256=form["source_sha256"],
                           **run_ids).after(opened)
        k8s.io_step(fetched, cpu="1", memory="2Gi")
        tokenized = preprocess(corpus_uri=fetched.outputs["corpus_uri"], params=params, **run_ids)
        k8s.io_step(tokenized, cpu="4", memory="8Gi")
        dataset_uri = tokenized.outputs["dataset_uri"]

        checked = validate(params=params, dataset_uri=dataset_uri, max_steps=max_steps,
                           target=target, num_gpus=num_gpus, num_nodes=num_nodes,
                           gpu_type=form["gpu_type"], **run_ids)
        k8s.heavy_step(checked, cpu="2", memory="8Gi", timeout_s=30 * 60, **heavy)

        branch = dict(params=params, dataset_uri=dataset_uri, max_steps=max_steps,
                      num_gpus=num_gpus, num_nodes=num_nodes, run_ids=run_ids)
        with dsl.If(target == "gpu", name="target-gpu"):
            gpu_compiled, gpu_trained = _compile_and_train(target="gpu", **branch)
            for task in (gpu_compiled, gpu_trained):
                task.after(checked).set_container_image(image_for("cuda"))
                # kfp-kubernetes allows one node selector per task, and any number of tolerations.
                k8s.heavy_step(task, cpu="8", memory="64Gi", timeout_s=72 * 3600,
                               node_selector=form["gpu_node_selector"], tolerations=tolerations)
                k8s.tolerate(task, form["gpu_tolerations"])
                k8s.gpus(task, num_gpus)
            gpu_trained.set_env_variable(ENV_TRAINER_IMAGE, image_for("cuda"))  # TrainJob nodes
        with dsl.Elif(target == "cerebras", name="target-cerebras"):
            cs_compiled, cs_trained = _compile_and_train(target="cerebras", **branch)
            for task in (cs_compiled, cs_trained):
                # The appliance does the compute; the pod is a client that streams data to it.
                task.after(checked).set_container_image(image_for("cerebras"))
                k8s.heavy_step(task, cpu="16", memory="64Gi", timeout_s=72 * 3600, **heavy)
        with dsl.Else(name="target-cpu"):
            cpu_compiled, cpu_trained = _compile_and_train(target="cpu", **branch)
            for task in (cpu_compiled, cpu_trained):
                task.after(checked)
                k8s.heavy_step(task, cpu="8", memory="16Gi", timeout_s=24 * 3600, **heavy)

        model_uri = dsl.OneOf(gpu_trained.outputs["model_uri"], cs_trained.outputs["model_uri"],
                              cpu_trained.outputs["model_uri"])
        checkpoints_uri = dsl.OneOf(gpu_trained.outputs["checkpoints_uri"],
                                    cs_trained.outputs["checkpoints_uri"],
                                    cpu_trained.outputs["checkpoints_uri"])
        compile_cache_uri = dsl.OneOf(gpu_compiled.outputs["compile_cache_uri"],
                                      cs_compiled.outputs["compile_cache_uri"],
                                      cpu_compiled.outputs["compile_cache_uri"])

        evaluated = evaluate(params=params, dataset_uri=dataset_uri, model_uri=model_uri, **run_ids)
        k8s.heavy_step(evaluated, cpu="4", memory="16Gi", timeout_s=6 * 3600, **heavy)

        registered = promote(params=params, dataset_uri=dataset_uri, model_uri=model_uri,
                             eval_metrics_json=evaluated.outputs["metrics_json"], **run_ids)
        k8s.heavy_step(registered, cpu="4", memory="16Gi", timeout_s=6 * 3600, **heavy)
        registered.set_caching_options(False)  # the champion may have changed since last time

        recorded = record_results(
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, experiment=experiment,
            corpus_uri=fetched.outputs["corpus_uri"], dataset_uri=dataset_uri,
            validation_report_uri=checked.outputs["report_uri"],
            compile_cache_uri=compile_cache_uri, model_uri=model_uri,
            checkpoints_uri=checkpoints_uri,
            eval_report_uri=evaluated.outputs["report_uri"],
            eval_metrics_json=evaluated.outputs["metrics_json"],
            model_version=registered.outputs["model_version"],
            promoted=registered.outputs["promoted"],
        )
        k8s.bookkeeping(recorded)


gpt2_pipeline = dsl.pipeline(name=PIPELINE_NAME, description=_pipeline.__doc__.splitlines()[0])(
    kfp_signature(_pipeline, PipelineParameters))


def compile_pipeline(package_path: str) -> str:
    """Write the pipeline spec (YAML) to `package_path`."""
    from kfp import compiler

    compiler.Compiler().compile(gpt2_pipeline, package_path=package_path)
    return package_path
