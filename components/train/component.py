from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(
    params: str,
    dataset_uri: str,
    compile_cache_uri: str,
    max_steps: int,
    target: str,
    num_gpus: int,
    num_nodes: int,
    pipeline_run_id: str,
    artifact_root: str,
    experiment: str,
    model: Output[Model],
    checkpoints: Output[Artifact],
    metrics: Output[Metrics],
    loss_curve: Output[HTML],
) -> NamedTuple("TrainOutputs", model_uri=str, checkpoints_uri=str):
    """Train GPT-2 on the preprocessed data; the same function serves the cpu, gpu and cerebras
    targets (the pipeline runs it on the matching node pool and image).

    Args:
        params: config name or path / s3:// URI of a Cerebras YAML.
        dataset_uri: the preprocess stage's HDF5 dataset folder.
        compile_cache_uri: the compile stage's cache folder, reused to skip recompilation.
        max_steps: training steps (0 = the config's runconfig.max_steps).
        target: cpu | gpu | cerebras.
        num_gpus: GPUs per node for target gpu: one training process per GPU (torchrun).
        num_nodes: nodes for target gpu; past 1 this step runs training as a Kubeflow Trainer
            TrainJob (image $GPT2OPS_TRAINER_IMAGE) and follows it to the end.
        pipeline_run_id: KFP run id; names the artifact folder and finds the MLflow parent run.
        artifact_root: s3://bucket/prefix (or a local folder) holding all artifacts.
        experiment: MLflow experiment of the parent run.
    Returns:
        model_uri: final weights (safetensors) and config.
        checkpoints_uri: the training checkpoints folder.
    """
    import tempfile

    from components.kfp_io import loss_curve_html, publish, stage_context, write_text
    from gpt2core.launch import launch
    from gpt2core.stages.train import Request

    # A fresh working folder: the stage resumes from checkpoints it finds there, and a folder shared
    # between runs (runconfig.model_dir is relative to the working directory) would resume another run.
    with tempfile.TemporaryDirectory(prefix="gpt2ops-train-") as model_dir:
        request = Request(params=params, dataset=dataset_uri, max_steps=max_steps or None, target=target,
                          compile_cache=compile_cache_uri or None, model_dir=model_dir)
        result = launch("train", stage_context(pipeline_run_id, artifact_root, experiment), request,
                        nproc_per_node=num_gpus if target == "gpu" else 1, num_nodes=num_nodes)
    publish(result, {"model": model, "checkpoints": checkpoints}, metrics)
    write_text(loss_curve, loss_curve_html(result))
    return result.outputs["model"], result.outputs["checkpoints"]
