from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Markdown, Metrics, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def preprocess(
    corpus_uri: str,
    params: str,
    pipeline_run_id: str,
    artifact_root: str,
    experiment: str,
    dataset: Output[Dataset],
    metrics: Output[Metrics],
    stats: Output[Markdown],
) -> NamedTuple("PreprocessOutputs", dataset_uri=str):
    """Tokenize the corpus into Cerebras-layout HDF5 (`train/` and `val/`) with the config's
    sequence length.

    Args:
        corpus_uri: the download stage's corpus folder.
        params: config name (gpt2_tiny, gpt2_small, ...) or path / s3:// URI of a Cerebras YAML.
        pipeline_run_id: KFP run id; names the artifact folder and finds the MLflow parent run.
        artifact_root: s3://bucket/prefix (or a local folder) holding all artifacts.
        experiment: MLflow experiment of the parent run.
    Returns:
        dataset_uri: the HDF5 dataset folder (with data_params.json and h5_dataset_stats).
    """
    from components.kfp_io import markdown_table, publish, stage_context, write_text
    from gpt2core.launch import launch
    from gpt2core.stages.preprocess import Request

    result = launch("preprocess", stage_context(pipeline_run_id, artifact_root, experiment),
                    Request(input_dir=corpus_uri, params=params))
    publish(result, {"dataset": dataset}, metrics)
    write_text(stats, f"# HDF5 dataset\n\n`{result.outputs['dataset']}`\n\n"
               + markdown_table(result.metrics, header=("statistic", "value")))
    return (result.outputs["dataset"],)
