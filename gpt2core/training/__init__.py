"""GPT-2 training from small parts: optimizer, schedule, checkpoint, parallel, metrics, trainer."""

from gpt2core.training.trainer import TrainResult, train

__all__ = ["TrainResult", "train"]
