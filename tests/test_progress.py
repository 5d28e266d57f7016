"""Progress lines: durations, time left, and when a line is logged."""

from __future__ import annotations

import logging
import re

import pytest

from gpt2core.progress import ProgressLog, format_duration, time_left


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (42.4, "42s"), (59.6, "1m00s"), (185, "3m05s"),
                                           (3725, "1h02m"), (-3, "0s")])
def test_durations_read_as_hours_minutes_seconds(seconds, text):
    assert format_duration(seconds) == text


def test_time_left_is_the_remaining_units_at_the_mean_rate():
    assert time_left(10, 40, 5.0) == 15.0
    assert time_left(40, 40, 5.0) == 0.0


def test_a_line_per_interval_and_one_at_the_end(caplog):
    logger = logging.getLogger("gpt2core.test_progress")
    with caplog.at_level("INFO", logger=logger.name):
        every = ProgressLog(logger, "evaluate", 3, every_s=0)
        for done in (1, 2, 3):
            every.update(done, 100)
        lines = [r.getMessage() for r in caplog.records]
        assert [line.split(" | ")[0] for line in lines] == ["evaluate: batch 1/3", "evaluate: batch 2/3",
                                                            "evaluate: batch 3/3"]
        assert re.fullmatch(r"evaluate: batch 1/3 \| [\d,]+ tok/s \| eta \d+s", lines[0])
        assert re.fullmatch(r"evaluate: batch 3/3 \| [\d,]+ tok/s \| 300 tokens in \d+s", lines[2])
        caplog.clear()
        rare = ProgressLog(logger, "evaluate", 3, every_s=3600)  # no interval passes: only the last line
        for done in (1, 2, 3):
            rare.update(done, 100)
        assert [r.getMessage().split(" | ")[0] for r in caplog.records] == ["evaluate: batch 3/3"]
        caplog.clear()
        ProgressLog(logger, "evaluate", 1, every_s=0, enabled=False).update(1, 100)  # another rank
        assert not caplog.records
