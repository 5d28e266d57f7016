from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(
    config: str,
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
        config: config name or path / s3:// URI of a Cerebras YAML.
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
    from components.runtime import (png_img, publish, stage_context, stage_overrides, train_on_processes,
                                    write_text)
    from gpt2core.platform import tracking

    ctx = stage_context(pipeline_run_id, artifact_root, experiment)
    result = train_on_processes(config, ctx=ctx, overrides=stage_overrides(dataset_uri, max_steps),
                                compile_cache_uri=compile_cache_uri, target=target,
                                nproc=num_gpus if target == "gpu" else 1, num_nodes=num_nodes)
    publish(result, {"model": model, "checkpoints": checkpoints}, metrics)
    run_id = tracking.stage_run_id(ctx.parent_run_id, "train")
    png = tracking.loss_curve_png(run_id) if run_id else None  # = the run's plots/loss_curve.png
    chart = png_img(png, "training loss") if png else "<p>no loss values logged</p>"
    write_text(loss_curve, f"<html><body><h2>Training loss</h2>{chart}"
               f"<p>model: <code>{result.outputs['model']}</code></p></body></html>")
    return result.outputs["model"], result.outputs["checkpoints"]
