"""Progress lines: durations, and a phase's throughput and time left from a clock."""

from __future__ import annotations

import logging

import pytest

from kd import progress
from kd.progress import Pace, chunks_with_progress, eta


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0s"), (41.4, "41s"), (59.6, "1m00s"), (185, "3m05s"), (3599, "59m59s"), (3720, "1h02m"),
     (float("inf"), "?"), (float("nan"), "?"), (-1, "?")],
)  # fmt: skip
def test_a_duration_reads_as_a_person_plans_by_it(seconds, shown):
    assert eta(seconds) == shown


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_phase_counts_its_time_left_from_the_steps_done_since_it_started(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    pace = Pace(total=10, done=2, every_s=30)  # resumed after 2 steps: those took no time here
    assert pace.left_s() == float("inf") and pace.line().endswith("ETA ?")
    clock.now += 8.0
    for _ in range(4):
        pace.advance(images=32)
    assert pace.left_s() == pytest.approx(8.0) and pace.line() == "16 img/s, ETA 8s"  # 4 of 8 left, 2 s each
    assert pace.due() is False
    clock.now += 30.0
    assert pace.due() is True and pace.due() is False  # one line, then the next wait


def test_a_pass_logs_its_progress_when_piped_and_its_rate_at_the_end(monkeypatch, caplog):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    seen = []
    with caplog.at_level(logging.INFO, logger="kd"):
        for start in chunks_with_progress(range(0, 250, 100), 250, "teacher logits", bar=False, every_s=0.0):
            seen.append(start)
            clock.now += 1.0
    assert seen == [0, 100, 200]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "teacher logits: 100/250 images, 100 img/s, ETA 2s",
        "teacher logits: 200/250 images, 100 img/s, ETA 1s",
        "teacher logits: 250/250 images, 83 img/s, ETA 0s",
        "teacher logits: 250 images in 3s (83 img/s)",
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kd"):
        list(chunks_with_progress(range(0, 250, 100), 250, "teacher logits", bar=True, every_s=0.0))
    assert [r.getMessage() for r in caplog.records] == ["teacher logits: 250 images in 0s (0 img/s)"] or len(
        caplog.records
    ) == 1  # on a terminal the bar shows the way: only the closing line is logged
