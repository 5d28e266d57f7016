from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Markdown, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate(
    params: str,
    dataset_uri: str,
    max_steps: int,
    target: str,
    num_gpus: int,
    num_nodes: int,
    gpu_type: str,
    pipeline_run_id: str,
    artifact_root: str,
    experiment: str,
    report: Output[Markdown],
) -> NamedTuple("ValidateOutputs", report_uri=str):
    """Check config, data and memory for the chosen target before spending accelerator time.

    Args:
        params: config name or path / s3:// URI of a Cerebras YAML.
        dataset_uri: the preprocess stage's HDF5 dataset folder.
        max_steps: training steps (0 = the config's runconfig.max_steps).
        target: cpu | gpu | cerebras.
        num_gpus: GPUs per node (gpu target).
        num_nodes: nodes (gpu target); the checks see num_nodes x num_gpus devices.
        gpu_type: GPU model whose memory the estimate is checked against (e.g. H100).
        pipeline_run_id: KFP run id; names the artifact folder and finds the MLflow parent run.
        artifact_root: s3://bucket/prefix (or a local folder) holding all artifacts.
        experiment: MLflow experiment of the parent run.
    Returns:
        report_uri: the validation report folder.
    """
    from components.kfp_io import report_markdown, stage_context, write_text
    from gpt2core.launch import launch
    from gpt2core.stages.validate import Request

    request = Request(params=params, dataset=dataset_uri, max_steps=max_steps or None, target=target,
                      num_gpus=num_nodes * num_gpus, gpu_type=gpu_type)
    result = launch("validate", stage_context(pipeline_run_id, artifact_root, experiment), request)
    write_text(report, report_markdown(result.outputs["report"], "Validation report"))
    return (result.outputs["report"],)
