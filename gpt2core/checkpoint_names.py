"""File names of training checkpoints, for both trainers: the one place that names, parses and
lists them. Imports neither torch nor the Cerebras SDK (the stages list and publish checkpoints from
the main venv; the cstorch flow runs in the SDK's).

- torch trainer (``gpt2core/training/checkpoint.py``): ``checkpoint_00000100.pt``, torch.save; the
  step zero-padded to 8 digits so names also sort by step.
- Cerebras target (``gpt2core/cerebras/flow.py``): ``checkpoint_100.mdl``, as the Model Zoo names
  them: cstorch's HDF5-based format (``cstorch.save``), not torch.save, hence a suffix of its own.
"""

from __future__ import annotations

import re
from pathlib import Path

TORCH = ".pt"
CEREBRAS = ".mdl"
FOLDER = "checkpoints"  # where training writes them, under its --model_dir (the reference writes them in it)
_NAMES = {TORCH: re.compile(r"^checkpoint_(\d+)\.pt$"), CEREBRAS: re.compile(r"^checkpoint_(\d+)\.mdl$")}


def checkpoint_name(step: int, suffix: str = TORCH) -> str:
    """The file name of the checkpoint taken after ``step`` (``suffix``: TORCH or CEREBRAS)."""
    return f"checkpoint_{step:08d}{TORCH}" if suffix == TORCH else f"checkpoint_{step}{CEREBRAS}"


def checkpoint_step(name: str | Path, suffix: str = TORCH) -> int | None:
    """The step of a checkpoint file name or path (``checkpoint_00000100.pt`` -> 100), else None."""
    match = _NAMES[suffix].match(Path(name).name)
    return int(match.group(1)) if match else None


def list_checkpoints(directory: str | Path, suffix: str = TORCH) -> list[Path]:
    """The complete checkpoints of format ``suffix`` in ``directory``, oldest step first (none if
    it does not exist; temporary files of a checkpoint being written are not listed)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(step, p) for p in directory.iterdir() if (step := checkpoint_step(p.name, suffix)) is not None]
    return [p for _, p in sorted(found)]
