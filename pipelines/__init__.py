"""The GPT-2 pre-training pipeline, its Kubernetes settings, and the run/pipeline commands."""
