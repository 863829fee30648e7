"""Where the live view goes: redrawn in place on a terminal, a line per change on a pipe.

On a terminal a rich `Live` display redraws the panel; it is transient, so when it stops
(Ctrl-C, the end of the run) the panel is erased and whatever is printed next (a final
summary) stands in its place, never interleaved with half a redraw. Anywhere else (a pipe,
a file, a journal) a line is written only when `SiteView.change_key` changes, and the
break-even prices only when they change.

While the panel is live, the terminal does not echo typed keys: an echoed "^C" or Enter
moves the cursor under the panel, and the next redraw would then leave a stray line
behind (the "stoppedak-even" of old). Ctrl-C still interrupts; echo comes back on exit.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, TextIO

from rich.console import Console, RenderableType
from rich.live import Live

from controller.view.site import SiteView


class Screen:
    """The view's output on `out`; a context manager around the live display.

    Args:
        out: Where the view goes: redrawn in place on a terminal, else a line per change.
        force_terminal: Treat `out` as a terminal (True) or not (False); None: ask it.
    """

    def __init__(self, out: TextIO, *, force_terminal: bool | None = None) -> None:
        self.out = out
        self.console = Console(file=out, highlight=False, force_terminal=force_terminal)
        self.tty = self.console.is_terminal
        self.live: Live | None = (
            Live(console=self.console, auto_refresh=False, transient=True,
                 redirect_stdout=False, redirect_stderr=True) if self.tty else None)
        self._last_key: tuple[object, ...] | None = None
        self._last_breakevens = ""
        self.lines_written = 0
        self._saved_tty: tuple[int, list[Any]] | None = None

    def __enter__(self) -> Screen:
        if self.live is not None:
            self._echo_off()
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            try:
                self.live.stop()
            finally:
                self._echo_restore()

    def _echo_off(self) -> None:
        try:
            import termios  # noqa: PLC0415 - POSIX only

            fd = sys.stdin.fileno()
            if not sys.stdin.isatty():
                return
            saved = termios.tcgetattr(fd)
            quiet = list(saved)
            quiet[3] &= ~(termios.ECHO | termios.ECHOCTL)
            termios.tcsetattr(fd, termios.TCSANOW, quiet)
            self._saved_tty = (fd, saved)
        except (ImportError, OSError, ValueError, AttributeError):
            # Not a terminal we can set (Windows, a closed or replaced stdin): echo stays.
            self._saved_tty = None

    def _echo_restore(self) -> None:
        if self._saved_tty is None:
            return
        import termios  # noqa: PLC0415

        fd, saved = self._saved_tty
        self._saved_tty = None
        with contextlib.suppress(OSError):
            termios.tcsetattr(fd, termios.TCSANOW, saved)

    def show(self, view: SiteView) -> None:
        """Redraw (terminal), or write a line if something changed since the last (pipe)."""
        if self.live is not None:
            self.live.update(view.render(), refresh=True)
            return
        if view.summary is None and view.link is None:
            return
        breakevens = view.breakevens()
        if breakevens and breakevens != self._last_breakevens:
            self.write(breakevens)
        self._last_breakevens = breakevens
        key = view.change_key()
        if key != self._last_key:
            self.write(view.line())
            self._last_key = key

    def final(self, title: str, view: SiteView) -> None:
        """The closing summary: a rule and the panel on a terminal, two lines elsewhere."""
        if self.tty:
            from rich.rule import Rule  # noqa: PLC0415

            self.print(Rule(title))
            self.print(view.render())
        else:
            self.write(f"== {title} ==")
            self.write(view.line())

    def print(self, renderable: RenderableType) -> None:
        """Print above the live display (terminal) or as it is."""
        (self.live.console if self.live is not None else self.console).print(renderable)

    def write(self, text: str) -> None:
        """A plain line of text (never wrapped on a pipe)."""
        if self.tty:
            self.print(text)
        else:
            self.out.write(text + "\n")
            self.out.flush()
        self.lines_written += 1
