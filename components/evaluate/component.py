from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Markdown, Metrics, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    params: str,
    dataset_uri: str,
    model_uri: str,
    pipeline_run_id: str,
    artifact_root: str,
    experiment: str,
    metrics: Output[Metrics],
    report: Output[Markdown],
) -> NamedTuple("EvaluateOutputs", report_uri=str, metrics_json=str):
    """Evaluate the trained model on the validation split (eval/loss, eval/lm_perplexity,
    eval/accuracy) and sample text from it.

    Args:
        params: config name or path / s3:// URI of a Cerebras YAML.
        dataset_uri: the preprocess stage's HDF5 dataset folder (its val/ split is evaluated).
        model_uri: the train stage's model folder.
        pipeline_run_id: KFP run id; names the artifact folder and finds the MLflow parent run.
        artifact_root: s3://bucket/prefix (or a local folder) holding all artifacts.
        experiment: MLflow experiment of the parent run.
    Returns:
        report_uri: the evaluation report folder (metrics and samples).
        metrics_json: the eval metrics as a JSON object.
    """
    import json

    from components.kfp_io import publish, report_markdown, stage_context, write_text
    from gpt2core.launch import launch
    from gpt2core.stages.evaluate import Request

    result = launch("evaluate", stage_context(pipeline_run_id, artifact_root, experiment),
                    Request(params=params, dataset=dataset_uri, model_dir=model_uri))
    publish(result, {}, metrics)
    write_text(report, report_markdown(result.outputs["report"], "Evaluation"))
    return result.outputs["report"], json.dumps(result.metrics, sort_keys=True)
