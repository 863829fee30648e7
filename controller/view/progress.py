"""Progress of a long job on stderr (rich), shown only where a person watches.

`mineops events export` of a long journal, the LuxOS APIs of a large `mineops simulate`
and the bridge's first poll of every miner use it; on a pipe or a log it prints nothing,
so captured output stays what the job produces.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Update = Callable[[int], None]


def wanted(setting: str, stream: TextIO | None = None) -> bool:
    """Whether to show progress: "on", "off", or "auto" (when `stream` is a terminal)."""
    if setting in ("on", "off"):
        return setting == "on"
    s = sys.stderr if stream is None else stream
    return bool(getattr(s, "isatty", lambda: False)())


class JobProgress:
    """A bar for `total` steps: call it with the steps done; it ends itself at `total`.

    For a job whose end is reached inside other code (the bridge's first poll): no
    context to hold open.

    Args:
        label: The text before the bar.
        total: The steps of the job (negative counts as 0).
        enabled: Show the bar; None: when `stream` is a terminal. Disabled, calling it
            does nothing.
        stream: Where it is drawn; None: stderr.
    """

    def __init__(self, label: str, total: int, *, enabled: bool | None = None,
                 stream: TextIO | None = None) -> None:
        s = sys.stderr if stream is None else stream
        self.total = max(total, 0)
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        if not (wanted("auto", s) if enabled is None else enabled):
            return
        console = Console(file=s, force_terminal=enabled or None)
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(),
                             MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                             TimeRemainingColumn(), console=console, transient=False,
                             # Log lines on stderr print above the bar, not through it.
                             redirect_stdout=False, redirect_stderr=s is sys.stderr)
        self._task = self._bar.add_task(label, total=self.total)
        self._bar.start()

    def __call__(self, done: int) -> None:
        """Show `done` of the total; at the total the bar stops (`close`)."""
        if self._bar is None or self._task is None:
            return
        self._bar.update(self._task, completed=min(done, self.total))
        if done >= self.total:
            self.close()

    def close(self) -> None:
        """Stop drawing (idempotent); the bar stays on screen as it was."""
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.stop()


@contextmanager
def progress(label: str, total: int, *, enabled: bool | None = None,
             stream: TextIO | None = None) -> Iterator[Update]:
    """A progress bar for `total` steps; yields `done(n)`, which sets the steps done to n.

    `enabled` None shows it when `stream` (default stderr) is a terminal. The bar stays on
    screen when the job ends, with the time it took.
    """
    bar = JobProgress(label, total, enabled=enabled, stream=stream)
    try:
        yield bar
        bar(bar.total)
    finally:
        bar.close()
