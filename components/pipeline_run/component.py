"""The pipeline run's own bookkeeping: check the run form and open the MLflow parent run, record
the results on it, and close it FINISHED or FAILED from the exit handler. Never cached: each
pipeline run gets its own parent run even when every stage is served from the cache."""

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
    """Open the MLflow parent run of this pipeline run, then check the run-form parameters, so a bad
    value fails here (recorded on the parent run) before any data moves.

    Returns:
        The MLflow parent run id.
    """
    from gpt2core.pipeline_parameters import PipelineParameters
    from gpt2core.platform import tracking
    from gpt2core.platform.context import RunContext

    form = dict(params=params, source=source, target=target, num_gpus=num_gpus, num_nodes=num_nodes,
                gpu_type=gpu_type, max_steps=max_steps, artifact_root=artifact_root, experiment=experiment,
                run_name=run_name)
    ctx = RunContext(pipeline_run_id=pipeline_run_id, artifact_root=artifact_root, experiment=experiment)
    parent_run_id = ""
    if str(experiment).strip():  # else there is no experiment to record in: the check names the parameter
        parent_run_id = tracking.start_pipeline_run(ctx, params=form, run_name=run_name)  # tagged with the run id
    PipelineParameters.create(**form).check()
    return parent_run_id


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

    from components.kfp_io import markdown_table, write_text
    from gpt2core.platform import tracking

    parent_run_id = tracking.find_parent_run(pipeline_run_id, experiment)
    artifacts = {"download/corpus": corpus_uri, "preprocess/dataset": dataset_uri,
                 "validate/report": validation_report_uri, "compile/compile_cache": compile_cache_uri,
                 "train/model": model_uri, "train/checkpoints": checkpoints_uri,
                 "evaluate/report": eval_report_uri}
    eval_metrics = json.loads(eval_metrics_json)
    tracking.record_pipeline_results(parent_run_id, artifacts=artifacts, metrics=eval_metrics,
                                     model_version=model_version, promoted=promoted)
    write_text(summary, "# gpt2ops pipeline run\n\n"
               f"MLflow parent run `{parent_run_id}` (experiment `{experiment}`)\n\n"
               f"Model version {model_version}: "
               f"{'promoted to champion' if promoted else 'champion kept'}\n\n"
               "## Evaluation\n\n" + markdown_table(eval_metrics, header=("metric", "value"))
               + "\n## Artifacts\n\n" + markdown_table(artifacts, header=("artifact", "uri")))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def end_run(pipeline_run_id: str, experiment: str, status: dsl.PipelineTaskFinalStatus) -> None:
    """Exit handler: mark the MLflow parent run FINISHED, or FAILED with the failing task."""
    from gpt2core.errors import TrackingError
    from gpt2core.platform import tracking

    try:
        parent_run_id = tracking.find_parent_run(pipeline_run_id, experiment)
    except TrackingError as exc:  # start_run itself failed before opening the parent run
        print(f"no parent run to close: {exc}")
        return
    succeeded = status.state == "SUCCEEDED"
    tracking.end_pipeline_run(parent_run_id, "FINISHED" if succeeded else "FAILED",
                              error=None if succeeded else (status.error_message or status.state))
