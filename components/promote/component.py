from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Markdown, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(
    params: str,
    dataset_uri: str,
    model_uri: str,
    eval_metrics_json: str,
    pipeline_run_id: str,
    artifact_root: str,
    experiment: str,
    decision: Output[Markdown],
) -> NamedTuple("PromoteOutputs", promoted=bool, model_version=str):
    """Register the trained model in the MLflow registry (`challenger` alias) and move the
    `champion` alias to it only if its eval/loss beats the champion's on the same eval set.

    Args:
        params: config name or path / s3:// URI of a Cerebras YAML (to re-evaluate the champion).
        dataset_uri: the preprocess stage's HDF5 dataset folder (its val/ split is the eval set).
        model_uri: the train stage's model folder.
        eval_metrics_json: the evaluate stage's metrics (eval/loss decides).
        pipeline_run_id: KFP run id; finds the MLflow parent run.
        artifact_root: s3://bucket/prefix (or a local folder) holding all artifacts.
        experiment: MLflow experiment of the parent run.
    Returns:
        promoted: whether the model became the champion.
        model_version: its registered version.
    """
    import json

    from components.kfp_io import report_markdown, stage_context, write_text
    from gpt2core.launch import launch
    from gpt2core.stages.promote import Request

    request = Request(params=params, dataset=dataset_uri, model_dir=model_uri,
                      eval_loss=json.loads(eval_metrics_json)["eval/loss"])
    result = launch("promote", stage_context(pipeline_run_id, artifact_root, experiment), request)
    write_text(decision, report_markdown(result.outputs["decision"], "Model registry"))
    return bool(result.metrics["promote/promoted"]), str(int(result.metrics["promote/version"]))
