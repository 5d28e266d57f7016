"""The pipeline run's own bookkeeping: check the run form and open the MLflow parent run, record
the results on it, and close it FINISHED or FAILED from the exit handler. Never cached: each
pipeline run gets its own parent run even when every stage is served from the cache. The work is
gpt2core.pipeline_run's, which an Argo workflow runs as `gpt2ops pipeline-run start|record|end`."""

from kfp import dsl
from kfp.dsl import Markdown, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def start_run(
    params: str,
    source: str,
    target: str,
    num_gpus: int,
    num_nodes: int,
    gpu_type: str,
    max_steps: int,
    run_name: str,
    pipeline_run_id: str,
    artifact_root: str,
    experiment: str,
) -> str:
    """Open the MLflow parent run of this pipeline run (or reopen it: a resumed run keeps its
    parent), then check the run-form parameters, so a bad value fails here (recorded on the parent
    run) before any data moves.

    Returns:
        The MLflow parent run id.
    """
    from components.kfp_io import pipeline_run_id as pinned
    from gpt2core import pipeline_run
    from gpt2core.platform.context import RunContext

    pipeline_run_id = pinned(pipeline_run_id)
    form = dict(params=params, source=source, target=target, num_gpus=num_gpus, num_nodes=num_nodes,
                gpu_type=gpu_type, max_steps=max_steps, artifact_root=artifact_root, experiment=experiment,
                run_name=run_name)
    ctx = RunContext(pipeline_run_id=pipeline_run_id, artifact_root=artifact_root, experiment=experiment)
    return pipeline_run.start(ctx, form)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def record_results(
    pipeline_run_id: str,
    experiment: str,
    corpus_uri: str,
    dataset_uri: str,
    validation_report_uri: str,
    compile_cache_uri: str,
    model_uri: str,
    checkpoints_uri: str,
    eval_report_uri: str,
    eval_metrics_json: str,
    model_version: str,
    promoted: bool,
    summary: Output[Markdown],
) -> None:
    """Put every artifact URI and the eval metrics on the parent run (also when the stages were
    served from the cache and so logged under an earlier parent) and render a run summary."""
    import json

    from components.kfp_io import markdown_table, pipeline_run_id as pinned, write_text
    from gpt2core import pipeline_run

    artifacts = {"download/corpus": corpus_uri, "preprocess/dataset": dataset_uri,
                 "validate/report": validation_report_uri, "compile/compile_cache": compile_cache_uri,
                 "train/model": model_uri, "train/checkpoints": checkpoints_uri,
                 "evaluate/report": eval_report_uri}
    eval_metrics = json.loads(eval_metrics_json)
    parent_run_id = pipeline_run.record(pinned(pipeline_run_id), experiment, artifacts=artifacts,
                                        eval_metrics=eval_metrics, model_version=model_version,
                                        promoted=promoted)
    write_text(summary, "# gpt2ops pipeline run\n\n"
               f"MLflow parent run `{parent_run_id}` (experiment `{experiment}`)\n\n"
               f"Model version {model_version}: "
               f"{'promoted to champion' if promoted else 'champion kept'}\n\n"
               "## Evaluation\n\n" + markdown_table(eval_metrics, header=("metric", "value"))
               + "\n## Artifacts\n\n" + markdown_table(artifacts, header=("artifact", "uri")))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def end_run(pipeline_run_id: str, experiment: str, status: dsl.PipelineTaskFinalStatus) -> None:
    """Exit handler: mark the MLflow parent run FINISHED, or FAILED with the failing task."""
    from components.kfp_io import pipeline_run_id as pinned
    from gpt2core import pipeline_run

    succeeded = status.state == "SUCCEEDED"
    pipeline_run.end(pinned(pipeline_run_id), experiment, succeeded=succeeded,
                     error=None if succeeded else (status.error_message or status.state))
