"""Shard progress in the rule's log: series and bytes done, throughput, every few seconds.

Workers report what finished (:meth:`Progress.add_bytes`, :meth:`Progress.series_done`);
a daemon thread logs a line every ``interval_s`` seconds and one final line on exit.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from types import TracebackType

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """Counters at one moment."""

    elapsed_s: float
    series_done: int
    series_total: int
    bytes_done: int
    bytes_expected: int | None


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KB'`` (powers of 1000, like s5cmd and the IDC index's MB)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_line(label: str, now: Snapshot, before: Snapshot | None) -> str:
    """One progress line; the recent rate is measured since ``before``."""
    expected = f" of ~{human_bytes(now.bytes_expected)}" if now.bytes_expected else ""
    overall = now.bytes_done / now.elapsed_s if now.elapsed_s > 0 else 0.0
    text = (
        f"{label}: {now.series_done}/{now.series_total} series, "
        f"{human_bytes(now.bytes_done)}{expected}, {human_bytes(overall)}/s overall"
    )
    if before is not None and now.elapsed_s > before.elapsed_s:
        recent = (now.bytes_done - before.bytes_done) / (now.elapsed_s - before.elapsed_s)
        text += f", {human_bytes(recent)}/s recent"
    return text


class Progress:
    """Thread-safe counters plus a logging thread; use as a context manager."""

    def __init__(
        self,
        label: str,
        series_total: int,
        bytes_expected: int | None = None,
        interval_s: float = 10.0,
    ) -> None:
        self.label = label
        self.series_total = series_total
        self.bytes_expected = bytes_expected
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._series = 0
        self._bytes = 0
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"progress {label}", daemon=True)
        self.lines: list[str] = []

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self._bytes += n

    def series_done(self, n: int = 1) -> None:
        with self._lock:
            self._series += n

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(
                time.monotonic() - self._start,
                self._series,
                self.series_total,
                self._bytes,
                self.bytes_expected,
            )

    def emit(self, before: Snapshot | None = None) -> Snapshot:
        """Log one line now; returns the snapshot it was made from."""
        now = self.snapshot()
        line = format_line(self.label, now, before)
        self.lines.append(line)
        log.info("%s", line)
        return now

    def _loop(self) -> None:
        before = None
        while not self._stop.wait(self.interval_s):
            before = self.emit(before)

    def __enter__(self) -> Progress:
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.emit()
