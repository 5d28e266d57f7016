from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def compile_model(
    params: str,
    dataset_uri: str,
    max_steps: int,
    target: str,
    pipeline_run_id: str,
    artifact_root: str,
    experiment: str,
    compile_cache: Output[Artifact],
) -> NamedTuple("CompileOutputs", compile_cache_uri=str):
    """Compile the training step for the target and save the compiler caches for the train step.

    Args:
        params: config name or path / s3:// URI of a Cerebras YAML.
        dataset_uri: the preprocess stage's HDF5 dataset folder.
        max_steps: training steps (0 = the config's runconfig.max_steps).
        target: cpu | gpu | cerebras.
        pipeline_run_id: KFP run id; names the artifact folder and finds the MLflow parent run.
        artifact_root: s3://bucket/prefix (or a local folder) holding all artifacts.
        experiment: MLflow experiment of the parent run.
    Returns:
        compile_cache_uri: the compiler cache folder.
    """
    from components.kfp_io import publish, stage_context
    from gpt2core.launch import launch
    from gpt2core.stages.compile import Request

    request = Request(params=params, dataset=dataset_uri, max_steps=max_steps or None, target=target)
    result = launch("compile", stage_context(pipeline_run_id, artifact_root, experiment), request)
    publish(result, {"compile_cache": compile_cache})
    return (result.outputs["compile_cache"],)
