from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Markdown, Metrics, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def preprocess(
    corpus_uri: str,
    config: str,
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
        config: config name (gpt2_tiny, gpt2_small, ...) or path / s3:// URI of a Cerebras YAML.
        pipeline_run_id: KFP run id; names the artifact folder and finds the MLflow parent run.
        artifact_root: s3://bucket/prefix (or a local folder) holding all artifacts.
        experiment: MLflow experiment of the parent run.
    Returns:
        dataset_uri: the HDF5 dataset folder (with data_params.json and h5_dataset_stats).
    """
    from components.runtime import markdown_table, publish, stage_context, write_text
    from gpt2core.config import load_params
    from gpt2core.data.preprocess import PreprocessParams
    from gpt2core.stages import preprocess as stage

    params = PreprocessParams(max_seq_length=load_params(config).train_input.max_sequence_length)
    result = stage.run(corpus_uri, ctx=stage_context(pipeline_run_id, artifact_root, experiment),
                       params=params)
    publish(result, {"dataset": dataset}, metrics)
    write_text(stats, f"# HDF5 dataset\n\n`{result.outputs['dataset']}`\n\n"
               + markdown_table(result.metrics, header=("statistic", "value")))
    return (result.outputs["dataset"],)
