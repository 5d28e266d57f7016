"""Names of the Cerebras target's checkpoints, readable without the SDK (the stages list and
publish them from the main venv).

``checkpoint_<step>.mdl`` as the Model Zoo names them: cstorch's HDF5-based format (``cstorch.save``),
not torch.save, hence a suffix of their own beside the torch trainer's ``checkpoint_<step>.pt``.
"""

from __future__ import annotations

import re
from pathlib import Path

_NAME = re.compile(r"^checkpoint_(\d+)\.mdl$")


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"checkpoint_{step}.mdl"


def checkpoint_step(path: str | Path) -> int | None:
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Cerebras checkpoints in ``directory``, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(step, p) for p in directory.iterdir() if (step := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]
