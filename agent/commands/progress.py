"""Progress on stderr for long steps (packing, prefill, eval questions): a rich bar on a terminal,
plain lines elsewhere (a pipe, CI, an editor), one every PROGRESS_EVERY_S seconds with the rate and
an ETA. Knows nothing of what it counts: callers give a label, a unit and (done, total) updates.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator

PROGRESS_EVERY_S = 5.0


class Ticker:
    """Plain progress lines through `emit`, at most one every `every_s` seconds (`label: done/total unit
    (pct), rate unit/s, ETA`), so a step shorter than that prints nothing. `first`: a line at the first
    update too; `final`: a line with the time taken when done reaches total."""

    def __init__(self, emit: Callable[[str], None], label: str, unit: str, every_s: float | None = None,
                 first: bool = False, final: bool = False):
        self.emit, self.label, self.unit, self.first, self.final = emit, label, unit, first, final
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.t0 = self.last = time.perf_counter()

    def update(self, done: int, total: int | None) -> None:
        now = time.perf_counter()
        if self.final and total and done >= total:
            self.emit(f"{self.label}: {total:,} {self.unit} in {now - self.t0:.1f}s")
        elif self.first or now - self.last >= self.every_s:
            self.first, self.last = False, now
            self.emit(self.line(done, total, now))

    def line(self, done: int, total: int | None, now: float) -> str:
        head = f"{self.label}: {done:,}/{total:,} {self.unit}" if total else f"{self.label}: {done:,} {self.unit}"
        elapsed = now - self.t0
        if not total or not done or elapsed <= 0:
            return head
        rate = done / elapsed
        shown = f"{rate:,.1f}" if rate < 10 else f"{rate:,.0f}"
        return f"{head} ({done / total:.0%}), {shown} {self.unit}/s, ETA {_duration((total - done) / rate)}"


@contextlib.contextmanager
def track(console, label: str, unit: str, quiet: bool) -> Iterator[Callable[[int, int], None]]:
    """An update(done, total) callback for one step: a transient rich bar when stderr is a terminal,
    plain `Ticker` lines on the console otherwise, nothing when quiet."""
    if quiet:
        yield lambda done, total: None
    elif sys.stderr.isatty():
        with _bar(console, label, unit) as update:
            yield update
    else:
        yield Ticker(lambda text: console.print(text, highlight=False, markup=False), label, unit).update


@contextlib.contextmanager
def _bar(console, label: str, unit: str):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    cols = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]
    with Progress(*cols, console=console, transient=True) as bar:
        task = bar.add_task("", total=None, rate="")

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)
            speed = bar.tasks[0].speed
            bar.update(task, rate=f"{speed:,.0f} {unit}/s" if speed else "")

        yield update


@contextlib.contextmanager
def announce(emit: Callable[[str], None], text: str) -> Iterator[None]:
    """Emit `text ...` once the block has run PROGRESS_EVERY_S seconds (a short step says nothing)."""
    timer = threading.Timer(PROGRESS_EVERY_S, emit, (f"{text} ...",))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"
