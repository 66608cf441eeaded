"""Progress of a conversion: a bar on a terminal, a few plain lines anywhere else.

tqdm redraws its bar in place with carriage returns. Written to a CI log or
through ``| tee`` that is one line which shows "0%" until the step ends (and
then nothing, since the bar is cleared). Off a terminal this module prints a
plain line at each quarter instead, so a log says how far a conversion got
and how long it took; the command's own summary line follows at the end.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any, Iterable, Iterator

#: Fractions of the work at which a plain line is printed off a terminal.
MARKS = (0.25, 0.5, 0.75, 1.0)


def progress(items: Iterable[Any], desc: str, *, total: int | None = None, unit: str = "tensors",
             stream: IO[str] | None = None) -> Iterator[Any]:
    """Yield ``items``, showing progress on ``stream`` (default stderr): a tqdm bar on a terminal, else plain lines."""
    stream = stream or sys.stderr
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if _is_terminal(stream):
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit.rstrip("s"), leave=False, file=stream)
        return
    yield from _plain(items, desc, total, unit, stream)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


def _plain(items: Iterable[Any], desc: str, total: int | None, unit: str, stream: IO[str]) -> Iterator[Any]:
    """``desc: 25/99 tensors (0.4 s)`` at each of :data:`MARKS` (just the count at the end when the total is unknown)."""
    started = time.perf_counter()
    marks = [max(1, round(total * mark)) for mark in MARKS] if total else []
    done = 0
    for item in items:
        yield item
        done += 1
        if marks and done >= marks[0]:
            while marks and done >= marks[0]:
                marks.pop(0)
            _line(stream, f"{desc}: {done}/{total} {unit} ({time.perf_counter() - started:.1f} s)")
    if not total or done < total:
        _line(stream, f"{desc}: {done} {unit} ({time.perf_counter() - started:.1f} s)")


def _line(stream: IO[str], text: str) -> None:
    print(text, file=stream, flush=True)
