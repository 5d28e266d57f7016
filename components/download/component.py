from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def download(
    source: str,
    include: str,
    sha256: str,
    pipeline_run_id: str,
    artifact_root: str,
    experiment: str,
    corpus: Output[Dataset],
    metrics: Output[Metrics],
) -> NamedTuple("DownloadOutputs", corpus_uri=str):
    """Fetch a raw text corpus into `<artifact_root>/<run>/download/corpus` (S3, with MANIFEST.json).

    Args:
        source: URL, s3:// URI or local path of a text file, archive or jsonl corpus.
        include: comma-separated glob patterns selecting files inside an archive ("" = all).
        sha256: expected sha256 of the downloaded file ("" = do not check).
        pipeline_run_id: KFP run id; names the artifact folder and finds the MLflow parent run.
        artifact_root: s3://bucket/prefix (or a local folder) holding all artifacts.
        experiment: MLflow experiment of the parent run.
    Returns:
        corpus_uri: where the corpus was written.
    """
    from components.kfp_io import publish, stage_context
    from gpt2core.launch import launch
    from gpt2core.stages.download import Request

    request = Request(source=source, include=include, sha256=sha256 or None)
    result = launch("download", stage_context(pipeline_run_id, artifact_root, experiment), request)
    publish(result, {"corpus": corpus}, metrics)
    return (result.outputs["corpus"],)
