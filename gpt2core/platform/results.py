"""What a stage hands back: its output URIs and headline metrics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StageResult:
    """What a stage returns: artifact name -> URI, and its headline metrics."""

    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
