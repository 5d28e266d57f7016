"""The GPT-2 pre-training pipeline (KFP v2):

    start_run -> download -> preprocess -> validate -> [gpu | cerebras | cpu: compile -> train]
              -> evaluate -> promote -> record_results            (exit handler: end_run)

Every stage writes its artifacts to `<s3_prefix>/<kfp-run-id>/<stage>/<artifact>/` and logs an
MLflow child run under the parent run that start_run opens; end_run closes the parent FINISHED or
FAILED whatever happened inside. The stages are cached on their inputs, which leave out the MLflow
parent run id on purpose (see components/runtime.py), so a rerun with the same parameters reuses the
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
from gpt2core.data.download import QUICKSTART_SOURCE
from gpt2core.images import image_for
from gpt2core.trainjob import ENV_TRAINER_IMAGE, GPU_NODE_SELECTOR, GPU_TOLERATIONS
from pipelines import kubernetes as k8s

PIPELINE_NAME = "gpt2ops-pretrain"


def _compile_and_train(*, config, dataset_uri, max_steps, target, num_gpus, num_nodes, run_ids):
    compiled = compile_model(config=config, dataset_uri=dataset_uri, max_steps=max_steps,
                             target=target, **run_ids)
    trained = train(config=config, dataset_uri=dataset_uri, max_steps=max_steps, target=target,
                    num_gpus=num_gpus, num_nodes=num_nodes,
                    compile_cache_uri=compiled.outputs["compile_cache_uri"], **run_ids)
    return compiled, trained


@dsl.pipeline(name=PIPELINE_NAME, description=__doc__.splitlines()[0])
def gpt2_pipeline(
    config: str = "gpt2_tiny",
    source: str = QUICKSTART_SOURCE.url,
    source_include: str = ",".join(QUICKSTART_SOURCE.include),
    source_sha256: str = QUICKSTART_SOURCE.sha256 or "",
    target: str = "cpu",
    num_gpus: int = 1,
    num_nodes: int = 1,
    gpu_type: str = "H100",
    node_selector: dict = {},
    tolerations: list = [],
    gpu_node_selector: dict = GPU_NODE_SELECTOR,
    gpu_tolerations: list = GPU_TOLERATIONS,
    max_steps: int = 0,
    experiment: str = "gpt2ops",
    s3_prefix: str = "s3://gpt2ops/runs",
    run_name: str = "",
):
    """Pre-train a GPT-2 model: download, preprocess, validate, compile, train, evaluate.

    Args:
        config: Config name (gpt2_tiny, gpt2_small, gpt2_medium, gpt2_large, gpt2_xl) or the path /
            s3:// URI of a Cerebras Model Zoo GPT-2 YAML.
        source: Raw text corpus: http(s):// URL, s3:// URI, hf://datasets/... or path of a text file,
            archive or jsonl (clear source_include and source_sha256 when changing it).
        source_include: Comma-separated glob patterns of the files to take from an archive source
            (empty: all files).
        source_sha256: Expected sha256 of the downloaded source (empty: not checked).
        target: Where training runs: gpu (GPU node pool), cerebras (Wafer-Scale Cluster) or cpu.
        num_gpus: GPUs per node for the compile and train steps when target is gpu.
        num_nodes: Training nodes when target is gpu; past 1 the train step runs a Kubeflow Trainer
            TrainJob of num_nodes x num_gpus GPUs (runtime gpt2ops-torchrun) and follows it.
        gpu_type: GPU model the memory check is made against when target is gpu (e.g. H100, A100).
        node_selector: Node labels the heavy steps off the GPU branch (validate, evaluate,
            promote, cpu and cerebras compile/train) must run on, e.g.
            {"cloud.google.com/gke-nodepool": "cpu-pool"} (empty: any node).
        tolerations: Tolerations for every heavy step, the GPU branch's included, e.g.
            [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}].
        gpu_node_selector: Node labels of the GPU pool, where the gpu branch's compile and train
            run (there it takes the place of node_selector); the default matches the Trainer
            runtime and docs/kubernetes.md.
        gpu_tolerations: Tolerations the gpu branch's compile and train get on top of
            tolerations; the default tolerates the GPU pool's nvidia.com/gpu:NoSchedule taint.
        max_steps: Training steps; 0 keeps the config's runconfig.max_steps.
        experiment: MLflow experiment of the runs.
        s3_prefix: s3://bucket/prefix under which every artifact of the run is stored.
        run_name: Name of the MLflow parent run (empty: MLflow picks one).
    """
    run_ids = dict(pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, artifact_root=s3_prefix,
                   experiment=experiment)
    heavy = dict(node_selector=node_selector, tolerations=tolerations)

    closing = end_run(pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, experiment=experiment)
    k8s.bookkeeping(closing)
    with dsl.ExitHandler(closing, name="gpt2-pretrain"):
        opened = start_run(config=config, source=source, target=target, num_gpus=num_gpus,
                           num_nodes=num_nodes, gpu_type=gpu_type, max_steps=max_steps,
                           run_name=run_name, **run_ids)
        k8s.bookkeeping(opened, retry=False)  # it fails on bad run-form values: fail at once

        fetched = download(source=source, include=source_include, sha256=source_sha256,
                           **run_ids).after(opened)
        k8s.io_step(fetched, cpu="1", memory="2Gi")
        tokenized = preprocess(corpus_uri=fetched.outputs["corpus_uri"], config=config, **run_ids)
        k8s.io_step(tokenized, cpu="4", memory="8Gi")
        dataset_uri = tokenized.outputs["dataset_uri"]

        checked = validate(config=config, dataset_uri=dataset_uri, max_steps=max_steps,
                           target=target, num_gpus=num_gpus, num_nodes=num_nodes,
                           gpu_type=gpu_type, **run_ids)
        k8s.heavy_step(checked, cpu="2", memory="8Gi", timeout_s=30 * 60, **heavy)

        branch = dict(config=config, dataset_uri=dataset_uri, max_steps=max_steps,
                      num_gpus=num_gpus, num_nodes=num_nodes, run_ids=run_ids)
        with dsl.If(target == "gpu", name="target-gpu"):
            gpu_compiled, gpu_trained = _compile_and_train(target="gpu", **branch)
            for task in (gpu_compiled, gpu_trained):
                task.after(checked).set_container_image(image_for("cuda"))
                # kfp-kubernetes allows one node selector per task, and any number of tolerations.
                k8s.heavy_step(task, cpu="8", memory="64Gi", timeout_s=72 * 3600,
                               node_selector=gpu_node_selector, tolerations=tolerations)
                k8s.tolerate(task, gpu_tolerations)
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

        evaluated = evaluate(config=config, dataset_uri=dataset_uri, model_uri=model_uri, **run_ids)
        k8s.heavy_step(evaluated, cpu="4", memory="16Gi", timeout_s=6 * 3600, **heavy)

        registered = promote(config=config, dataset_uri=dataset_uri, model_uri=model_uri,
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


def compile_pipeline(package_path: str) -> str:
    """Write the pipeline spec (YAML) to `package_path`."""
    from kfp import compiler

    compiler.Compiler().compile(gpt2_pipeline, package_path=package_path)
    return package_path
