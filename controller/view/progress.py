"""Progress of a long job on stderr (rich), shown only where a person watches.

`mineops events export` of a long journal, a large `mineops simulate` start-up and the
bridge's first poll of every miner use it; on a pipe or a log it prints nothing, so
captured output stays what the job produces.
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


@contextmanager
def progress(label: str, total: int, *, enabled: bool | None = None,
             stream: TextIO | None = None) -> Iterator[Update]:
    """A progress bar for `total` steps; yields `done(n)`, which sets the steps done to n.

    `enabled` None shows it when `stream` (default stderr) is a terminal. The bar stays on
    screen when the job ends, with the time it took.
    """
    s = sys.stderr if stream is None else stream
    if not (wanted("auto", s) if enabled is None else enabled):
        yield lambda _: None
        return
    console = Console(file=s, force_terminal=enabled or None)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                   console=console, transient=False, redirect_stdout=False,
                   redirect_stderr=False)
    task = bar.add_task(label, total=max(total, 0))
    with bar:
        yield lambda n: bar.update(task, completed=n)
        bar.update(task, completed=max(total, 0))
