"""Read-only access to a git mirror of the public Cerebras Model Zoo (github.com/Cerebras/modelzoo),
for tests that check gpt2ops against the reference's own files. Nothing of it is copied into the
project: tests read it at run time and skip when no mirror is present.

The mirror is a bare git directory: $GPT2OPS_MODELZOO_MIRROR, else /work/.mirror/Cerebras+modelzoo/repo.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

MIRROR = Path(os.environ.get("GPT2OPS_MODELZOO_MIRROR", "/work/.mirror/Cerebras+modelzoo/repo"))
GPT2_CONFIG_DIRS = ("modelzoo/transformers/pytorch/gpt2/configs",  # 1.x - 2.1
                    "src/cerebras/modelzoo/models/nlp/gpt2/configs")  # 2.2 - 2.3


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(MIRROR), *args], capture_output=True, text=True, check=True).stdout


def require_mirror() -> None:
    if not (MIRROR / "HEAD").is_file():
        pytest.skip(f"no Cerebras Model Zoo mirror at {MIRROR} (set GPT2OPS_MODELZOO_MIRROR)")


def tags() -> list[str]:
    require_mirror()
    return _git("tag").split()


def show(tag: str, path: str) -> str:
    """The text of ``path`` at release ``tag``."""
    require_mirror()
    return _git("show", f"{tag}:{path}")


def list_files(tag: str, folder: str) -> list[str]:
    """Paths of the files directly in ``folder`` at ``tag`` (none when it does not exist there)."""
    require_mirror()
    result = subprocess.run(["git", "-C", str(MIRROR), "ls-tree", "--name-only", tag, folder + "/"],
                            capture_output=True, text=True)
    return result.stdout.split()


def gpt2_configs() -> dict[str, str]:
    """Every distinct GPT-2 YAML of every release: ``"<tag>:<file name>"`` -> text."""
    found: dict[str, str] = {}
    seen: set[str] = set()
    for tag in tags():
        for folder in GPT2_CONFIG_DIRS:
            for path in list_files(tag, folder):
                if path.endswith(".yaml"):
                    text = show(tag, path)
                    if text not in seen:
                        seen.add(text)
                        found[f"{tag}:{path.rsplit('/', 1)[1]}"] = text
    return found
