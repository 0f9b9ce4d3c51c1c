"""Progress for long work, on stderr only: a rich progress bar at a terminal,
one plain line per stage when stderr is piped (a log file, CI).

A UI helper with no other effect: stdout (the commands' JSON) is never
touched, and nothing here decides anything. The CLI uses it for long steps
(a mirror sync of many records, an audit); the device fleet simulator for its
phases (grants, waiting, revoke, receipts)::

    with stage("verifying the ledger", total=n, unit="records") as s:
        for page in pages:
            ...
            s.advance(len(page))

Short work stays silent: a stage whose ``total`` is below ``quiet_below``
prints nothing at all.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO


class Stage:
    """One stage of long work; :meth:`advance` as items complete."""

    def __init__(self, bar: Any = None, task: Any = None) -> None:
        self._bar = bar
        self._task = task
        self.done = 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n)


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def stage(
    label: str,
    total: int | None = None,
    *,
    unit: str = "",
    prefix: str = "writ: ",
    quiet_below: int = 0,
    bar: bool = True,
    stream: TextIO | None = None,
) -> Iterator[Stage]:
    """A stage of long work: a transient progress bar at a terminal, else one line on ``stream``
    (default stderr) as the stage starts. Silent when ``total`` is known and below ``quiet_below``.
    ``bar=False`` prints the line even at a terminal (for timed work: a bar redraws from a thread)."""
    out = stream if stream is not None else sys.stderr
    if total is not None and total < quiet_below:
        yield Stage()
        return
    if not bar or not _is_tty(out):
        count = "" if total is None else f" ({total} {unit})" if unit else f" ({total})"
        out.write(f"{prefix}{label}{count}…\n")
        out.flush()
        yield Stage()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns: list[Any] = [TextColumn("{task.description}")]
    if total is not None:
        columns += [BarColumn(), MofNCompleteColumn()]
    columns.append(TimeElapsedColumn())
    started = time.monotonic()
    console = Console(file=out, stderr=out is sys.stderr)
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield Stage(progress, task)
    elapsed = time.monotonic() - started
    if elapsed >= 1.0:
        console.print(f"{prefix}{label}: done in {elapsed:.1f} s", markup=False, highlight=False)
