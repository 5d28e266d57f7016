"""The platform layer, below every stage: settings, run context and results, artifacts (local and
S3), the embedded S3 server and experiment tracking (MLflow). It never imports a stage, a launcher,
the CLI, the model or the trainer."""
