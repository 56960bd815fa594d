"""Progress you can plan by: throughput and the time a phase has left, measured as it
goes, for the bar on a terminal and the plain lines of a piped log."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from tqdm import tqdm

# One way to show a duration (41s, 3m05s, 1h02m; ? unknown), shared with the sweeper's ETA.
from hydra_plugins.kd_sweeper.trials import duration as eta

log = logging.getLogger("kd")


class Pace:
    """A phase of ``total`` steps (``done`` of them already, e.g. before a resume): its
    images per second and time left, over the wall time since it started (so the time
    spent validating between epochs is counted in), and when a piped log is due a line."""

    def __init__(self, total: int, done: int = 0, every_s: float = 30.0) -> None:
        self.total, self.done, self.images, self.every_s = total, done, 0, every_s
        self.started = self.last_line = time.perf_counter()
        self._first = done

    def advance(self, images: int, steps: int = 1) -> None:
        self.done += steps
        self.images += images

    def left_s(self) -> float:
        elapsed, steps = time.perf_counter() - self.started, self.done - self._first
        return (self.total - self.done) * elapsed / steps if steps > 0 else float("inf")

    def line(self) -> str:
        """``1,234 img/s, ETA 2m05s`` for the whole phase."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return f"{self.images / elapsed:,.0f} img/s, ETA {eta(self.left_s())}"

    def due(self) -> bool:
        """Whether ``every_s`` has passed since the last line (and starts the next wait)."""
        if time.perf_counter() - self.last_line < self.every_s:
            return False
        self.last_line = time.perf_counter()
        return True


def chunks_with_progress(starts: range, size: int, desc: str, bar: bool, every_s: float = 30.0) -> Iterator[int]:
    """The chunk starts of a pass over ``size`` images: a bar on a terminal, a line with
    throughput and ETA every ``every_s`` seconds in a piped log, and one at the end."""
    pace = Pace(len(starts), every_s=every_s)
    with tqdm(total=size, desc=desc, unit="img", disable=not bar, leave=False) as shown:
        for start in starts:
            yield start
            done = min(start + starts.step, size) - start
            pace.advance(done)
            shown.update(done)
            if not bar and pace.due():
                log.info("%s: %d/%d images, %s", desc, min(start + starts.step, size), size, pace.line())
    if len(starts):
        log.info("%s: %d images in %s (%s img/s)", desc, size, eta(time.perf_counter() - pace.started),
                 f"{size / max(time.perf_counter() - pace.started, 1e-9):,.0f}")  # fmt: skip
