from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Markdown, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(
    config: str,
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
        config: config name or path / s3:// URI of a Cerebras YAML (to re-evaluate the champion).
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

    from components.runtime import markdown_table, promote_model, stage_context, write_text

    result = promote_model(stage_context(pipeline_run_id, artifact_root, experiment),
                           config=config, dataset_uri=dataset_uri, model_uri=model_uri,
                           eval_loss=json.loads(eval_metrics_json)["eval/loss"])
    verdict = "promoted to champion" if result["promoted"] else "champion kept"
    write_text(decision, f"# Model registry: {verdict}\n\n" + markdown_table(result))
    return result["promoted"], result["version"]
