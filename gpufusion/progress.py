"""One progress line per stage, redrawn in place on stderr.

Every long stage (registering pairs, solving, fusing and writing a level, writing an OME-TIFF
level) shows one line of the same form::

    registering pairs          [#########-----------]  45/100 pairs  12.3/s  ETA 0:04

and, once finished, the same line with the elapsed time in place of the ETA, followed by a
newline. Each redraw starts with a carriage return and is padded with spaces to the length of
the line it replaces, so no characters of a longer earlier line are left behind. Redraws are
throttled (``interval``); on a narrow terminal the bar shortens, and a line is cut at the
terminal's width, so that it never wraps (a wrapped line cannot be redrawn in place).

Dask stages are counted with :func:`dask_progress`: a local-scheduler callback counting the
finished tasks of the computation it wraps. The CLI shows progress only on a terminal and
without ``--quiet`` (:func:`gpufusion.cli.show_progress`); a disabled :class:`Progress` writes
nothing and costs nothing.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar

__all__ = ["Progress", "dask_callback", "dask_progress"]

T = TypeVar("T")

#: Labels are padded to this width so that the bars of successive stages line up.
LABEL_WIDTH = 26
#: Characters of the bar between its brackets; on a narrow terminal it gets shorter, and
#: below MIN_BAR_WIDTH it is left out.
BAR_WIDTH = 20
MIN_BAR_WIDTH = 5
#: Columns of a line besides its label and bar, for a count up to ``12345/12345 tasks``, a
#: rate up to ``99,999/s`` and ``ETA 9:59:59``, separators and brackets, and the terminal's
#: last column (left free: writing it wraps the line on some terminals). On a terminal
#: narrower than the full line every bar gets what is left, so the bars still line up.
_OTHER_COLUMNS = 46


class Progress:
    """A labelled one-line progress display: count done/total, rate and time left.

    Parameters
    ----------
    label : str
        What the stage does, e.g. ``"registering pairs"``.
    total : int, optional
        Number of steps; None while unknown (only the count and elapsed time are shown).
    unit : str
        What a step is (``"pairs"``, ``"tiles"``, ``"tasks"``).
    enabled : bool
        False: nothing is written (every method is a no-op).
    stream : text stream, optional
        Where the line goes (default: ``sys.stderr`` at construction).
    clock : callable
        Time source in seconds (default :func:`time.monotonic`); tests pass a fake one.
    interval : float
        Seconds between redraws at least (the last step and :meth:`close` always redraw).

    Notes
    -----
    Call it from one thread (the dask callback runs in the thread that started the
    computation). Used as a context manager, the line is ended on the way out of an error
    too, so the message that follows starts on a line of its own.

    Examples
    --------
    >>> import io
    >>> out = io.StringIO()
    >>> ticks = iter([0.0, 1.0, 2.0])
    >>> with Progress("counting", 4, unit="steps", stream=out, clock=lambda: next(ticks),
    ...               interval=0) as bar:
    ...     bar.update(2)
    >>> out.getvalue().split("\\r")[-1].split()
    ['counting', '[##########----------]', '2/4', 'steps', '1.0/s', 'in', '0:02']
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        unit: str = "",
        enabled: bool = True,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval: float = 0.1,
    ) -> None:
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled
        self.done = 0
        self.closed = not enabled
        self._stream = stream if stream is not None else sys.stderr
        self._clock, self._interval = clock, interval
        self._start = self._drawn_at = clock() if enabled else 0.0
        self._shown = 0  # characters of the line on screen now
        self._columns = _terminal_columns(self._stream) if enabled else None
        if enabled and total is not None:
            self._draw(self._start)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # also on an error: the message that follows starts on a new line

    def add_total(self, n: int) -> None:
        """Add ``n`` steps to the total (a total that was unknown becomes ``n``)."""
        if self.closed:
            return
        self.total = (self.total or 0) + int(n)
        self._draw()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more steps done; redraws when ``interval`` has passed or all are done."""
        if self.closed:
            return
        self.done += int(n)
        now = self._clock()
        if now - self._drawn_at >= self._interval or self.done == self.total:
            self._draw(now)

    def iterate(self, items: Iterable[T]) -> Iterator[T]:
        """Yield ``items``, counting each one as it is handed out; closes the line when they
        are exhausted or the iteration is abandoned (an error in the consumer)."""
        try:
            for item in items:
                self.update(1)
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Draw the final line (elapsed time instead of ETA) and end it with a newline; a
        stage with neither a total nor a step done (a dask computation that ran elsewhere)
        leaves no line."""
        if self.closed:
            return
        if self.total is not None or self.done:
            self._draw(final=True)
        self.closed = True

    def render(self, now: float | None = None, final: bool = False) -> str:
        """The line as shown (without the carriage return and padding).

        On a terminal narrower than the full line the bar is shortened, or left out, so that
        the count, rate and time still fit; what is still too long is cut at the edge.
        """
        elapsed = max((self._clock() if now is None else now) - self._start, 0.0)
        done, total = self.done, self.total
        unit = f" {self.unit}" if self.unit else ""
        rate = done / elapsed if done and elapsed > 0 else None
        label = f"{self.label:<{LABEL_WIDTH}}"
        if total is None:
            parts = [label, f"{done}{unit}"]
        else:
            count = f"{done:>{len(str(total))}}/{total}{unit}"
            width = BAR_WIDTH
            if self._columns:
                width = min(width, self._columns - len(label) - _OTHER_COLUMNS)
            if width >= MIN_BAR_WIDTH:
                filled = width if total <= 0 else min(width, width * done // total)
                count = f"[{'#' * filled}{'-' * (width - filled)}] {count}"
            parts = [label, count]
        parts.append("--/s" if rate is None else f"{_number(rate)}/s")
        if final or total is None:
            parts.append(f"{'in' if final else 'elapsed'} {_duration(elapsed)}")
        elif rate is None:
            parts.append("ETA --:--")
        else:
            parts.append(f"ETA {_duration(max(total - done, 0) / rate)}")
        return "  ".join(parts)

    def _draw(self, now: float | None = None, final: bool = False) -> None:
        now = self._clock() if now is None else now
        text = self.render(now, final)
        if self._columns:  # a line longer than the terminal wraps and cannot be redrawn
            text = text[: self._columns - 1]
        pad = " " * max(self._shown - len(text), 0)
        end = "\n" if final else ""
        self._stream.write(f"\r{text}{pad}{end}")
        self._stream.flush()
        self._shown = 0 if final else len(text)
        self._drawn_at = now


def dask_callback(progress: Progress) -> Any:
    """A ``dask.callbacks.Callback`` that counts on ``progress`` the tasks of the computation
    it wraps (local schedulers only; a distributed client never calls it).

    The total is the number of tasks of the graph when the local scheduler starts it; each
    finished task counts one. Computations run one after another add to the total;
    computations started inside a task are not counted (dask runs them without the
    callbacks, and their scheduler state is not the one counted).
    """
    from dask.callbacks import Callback

    ours: list[dict] = []  # the scheduler state of the computation being counted

    def start_state(dsk: Any, state: dict) -> None:
        if not ours:
            ours.append(state)
            progress.add_total(len(state["ready"]) + len(state["waiting"]))

    def posttask(key: Any, result: Any, dsk: Any, state: dict, worker_id: Any) -> None:
        if ours and state is ours[0]:
            progress.update(1)

    def finish(dsk: Any, state: dict, errored: bool) -> None:
        if ours and state is ours[0]:
            ours.clear()

    return Callback(start_state=start_state, posttask=posttask, finish=finish)


@contextmanager
def dask_progress(
    label: str,
    enabled: bool = True,
    *,
    stream: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[Progress]:
    """A :class:`Progress` of dask tasks over the local-scheduler computations in the block.

    Examples
    --------
    >>> import io, dask.array as da
    >>> out = io.StringIO()
    >>> with dask_progress("summing", stream=out):
    ...     total = int(da.ones(100, chunks=10).sum().compute(scheduler="sync"))
    >>> line = out.getvalue().split("\\r")[-1]
    >>> line.startswith("summing"), line.endswith("\\n"), "[####################]" in line
    (True, True, True)
    """
    with Progress(label, unit="tasks", enabled=enabled, stream=stream, clock=clock) as progress:
        if not enabled:
            yield progress
            return
        with dask_callback(progress):
            yield progress


def _terminal_columns(stream: TextIO) -> int | None:
    """Width of the terminal ``stream`` writes to; None when it is not one."""
    try:
        return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else None
    except (AttributeError, OSError, ValueError):
        return None


def _number(value: float) -> str:
    """``12.3``, ``123``, ``12,345``."""
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def _duration(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"
