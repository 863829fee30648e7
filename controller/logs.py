"""Logging setup: structlog JSON lines for machines, readable lines on a terminal.

Times are ISO 8601 in UTC with the zone: the event's own `timestamp`, and every field that
carries a Unix time (named `*_ts`, as in the payloads), so a person reading the journal
sees 2024-08-20T23:00:00+00:00, not 1724194800.0.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

import structlog


def configure(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog once for the process (JSON unless stderr is a terminal)."""
    use_json = not sys.stderr.isatty() if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            iso_times,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    # Third-party libraries log through stdlib logging: keep them quiet unless asked.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def iso_times(_logger: Any, _method: str, event: MutableMapping[str, Any]
              ) -> MutableMapping[str, Any]:
    """A structlog processor: Unix-time fields (`*_ts`) as ISO 8601 UTC with the offset."""
    for key, value in event.items():
        if key.endswith("_ts") and isinstance(value, int | float) \
                and not isinstance(value, bool) and math.isfinite(value):
            event[key] = datetime.fromtimestamp(value, UTC).isoformat()
    return event


class _CurrentStderr:
    """Writes to whatever sys.stderr is at the time (not the object seen at configure time)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class LogLimiter:
    """Lets a repeated message through once per `interval_s` per key, counting the rest.

    Args:
        interval_s: The shortest time between two messages of one key, s (monotonic).
    """

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self._last: dict[tuple[str, ...], float] = {}
        self._suppressed: dict[tuple[str, ...], int] = {}

    def allow(self, *key: str) -> int | None:
        """None to stay quiet; else how many were suppressed since the last one let through."""
        now = time.monotonic()
        if now - self._last.get(key, -1e18) < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)
