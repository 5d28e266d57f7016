"""Progress in log lines: how far a loop of known length is, its throughput and the time left.

Log lines rather than a terminal bar: the stages run under kfp.local, torchrun and Kubernetes pods,
whose output is a log that a redrawn bar would garble.
"""

from __future__ import annotations

import logging
import time


def format_duration(seconds: float) -> str:
    """``seconds`` as ``1h02m``, ``3m05s`` or ``42s`` (rounded to the second)."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def time_left(done: int, total: int, elapsed_s: float) -> float:
    """Seconds until ``total`` units are done, at the mean rate of the ``done`` units that took
    ``elapsed_s`` seconds; ``done`` must be > 0."""
    return (total - done) * elapsed_s / done


class ProgressLog:
    """Periodic progress lines for a loop over ``total`` batches: at most one every ``every_s``
    seconds, and one when the last batch is done:

        evaluate: batch 40/140 | 10,240 tok/s | eta 12s

    ``tokens`` counts token positions (batch size x sequence length) processed by this process.
    Lines are logged only by the process that passes ``enabled=True`` (rank 0)."""

    def __init__(self, logger: logging.Logger, label: str, total: int, *, every_s: float = 5.0,
                 enabled: bool = True):
        self.logger, self.label, self.total = logger, label, total
        self.every_s, self.enabled = every_s, enabled
        self.started = self.last_line = time.perf_counter()
        self.tokens = 0

    def update(self, done: int, tokens: int) -> None:
        """``done`` batches are finished, ``tokens`` more token positions since the last update."""
        self.tokens += tokens
        now = time.perf_counter()
        if not self.enabled or (now - self.last_line < self.every_s and done < self.total):
            return
        self.last_line = now
        elapsed = max(now - self.started, 1e-9)
        line = f"{self.label}: batch {done}/{self.total} | {self.tokens / elapsed:,.0f} tok/s"
        if done < self.total:
            line += f" | eta {format_duration(time_left(done, self.total, elapsed))}"
        else:
            line += f" | {self.tokens:,} tokens in {format_duration(elapsed)}"
        self.logger.info(line)
