"""Durable journal of grid obligations: SQLite in WAL mode, one row per event, samples per event.

Every accepted event is written (and committed) before it takes effect, so a
controller killed at any moment resumes it after a restart. Events are keyed
by id: the same event received again (a retained message after a restart) is
recognised, not applied twice.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    received_ts REAL NOT NULL,
    status TEXT NOT NULL,
    baseline_w REAL,
    target_w REAL,
    reached_ts REAL,
    curtailed_wh REAL NOT NULL DEFAULT 0,
    violations INTEGER NOT NULL DEFAULT 0,
    samples_after_deadline INTEGER NOT NULL DEFAULT 0,
    updated_ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    event_id TEXT NOT NULL REFERENCES events(id),
    ts REAL NOT NULL,
    meter_w REAL,
    target_w REAL,
    cap_w REAL
);
CREATE INDEX IF NOT EXISTS samples_event ON samples(event_id, ts);
"""


@dataclass(slots=True)
class EventRow:
    """One journaled obligation and its compliance tallies."""

    id: str
    kind: str
    payload: dict[str, Any]
    received_ts: float
    status: str  # scheduled | active | completed | cancelled
    baseline_w: float | None
    target_w: float | None
    reached_ts: float | None
    curtailed_wh: float
    violations: int
    samples_after_deadline: int

    @property
    def complied(self) -> bool | None:
        """None until the deadline has passed with at least one sample."""
        if self.samples_after_deadline == 0:
            return None
        return self.violations == 0


class GridJournal:
    """The journal file; every write is committed before the call returns."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an accepted event survives power loss
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def upsert(self, event_id: str, kind: str, payload: dict[str, Any], now_ts: float,
               status: str) -> bool:
        """Record an event; False when the same id with the same content is already there."""
        text = json.dumps(payload, sort_keys=True)
        row = self._db.execute("SELECT payload FROM events WHERE id = ?", (event_id,)).fetchone()
        if row is not None and row[0] == text:
            return False
        if row is None:
            self._db.execute(
                "INSERT INTO events (id, kind, payload, received_ts, status, updated_ts) "
                "VALUES (?, ?, ?, ?, ?, ?)", (event_id, kind, text, now_ts, status, now_ts))
        else:
            self._db.execute("UPDATE events SET payload = ?, status = ?, updated_ts = ? "
                             "WHERE id = ?", (text, status, now_ts, event_id))
        return True

    def update(self, row: EventRow, now_ts: float) -> None:
        self._db.execute(
            "UPDATE events SET status = ?, baseline_w = ?, target_w = ?, reached_ts = ?, "
            "curtailed_wh = ?, violations = ?, samples_after_deadline = ?, updated_ts = ? "
            "WHERE id = ?",
            (row.status, row.baseline_w, row.target_w, row.reached_ts, row.curtailed_wh,
             row.violations, row.samples_after_deadline, now_ts, row.id))

    def add_sample(self, event_id: str, ts: float, meter_w: float | None, target_w: float,
                   cap_w: float) -> None:
        self._db.execute("INSERT INTO samples VALUES (?, ?, ?, ?, ?)",
                         (event_id, ts, meter_w, target_w, cap_w))

    def rows(self, *, open_only: bool = False) -> list[EventRow]:
        where = " WHERE status IN ('scheduled', 'active')" if open_only else ""
        cur = self._db.execute(
            "SELECT id, kind, payload, received_ts, status, baseline_w, target_w, reached_ts, "
            f"curtailed_wh, violations, samples_after_deadline FROM events{where} "
            "ORDER BY received_ts, id")
        return [EventRow(r[0], r[1], json.loads(r[2]), *r[3:]) for r in cur.fetchall()]

    def samples(self, event_id: str) -> list[tuple[float, float | None, float, float]]:
        cur = self._db.execute("SELECT ts, meter_w, target_w, cap_w FROM samples "
                               "WHERE event_id = ? ORDER BY ts", (event_id,))
        return [tuple(r) for r in cur.fetchall()]
