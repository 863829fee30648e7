"""Durable journal of grid obligations: SQLite in WAL mode, one row per event, samples per event.

Obey first, record after: the controller acts on an event from memory and the journal
records it. Every change is queued here and written at once, in one transaction
(`synchronous=FULL`, so a committed event survives power loss). When the disk refuses
(full, read-only, gone), the changes stay queued in memory, in order, and every later
`flush()` (each decision) tries again; `pending` counts what is not yet durable and
`last_error` says why. A queued event row holds its whole latest state, so the queue
grows with the number of events, not with time; samples beyond `MAX_PENDING_SAMPLES`
are dropped oldest first and counted (`samples_dropped`).

Events are keyed by id. A journal that cannot be opened raises `JournalError`, one
line naming the file and the reason; `journal_problem()` finds the same without
changing anything (for `check-config`).

One controller per journal: `lock_journal()` takes an exclusive `flock` on
`<journal>.lock`, held until the process exits. A second `mineops run` for the same
journal gets `JournalLocked`, naming the holder the lock file records. The kernel drops
the lock when the holder dies, however it dies, so a killed controller never blocks its
restart; the lock file itself stays (removing it would let two processes each lock a
different file of the same name).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sqlite3
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("mineops.journal")

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
# Columns added since the first schema: (name, SQL type). Older journals gain them on open.
_ADDED = (("version", "INTEGER"), ("target_basis_w", "REAL"),
          ("samples_without_meter", "INTEGER NOT NULL DEFAULT 0"))
_COLUMNS = ("id", "kind", "payload", "received_ts", "status", "baseline_w", "target_w",
            "reached_ts", "curtailed_wh", "violations", "samples_after_deadline", "version",
            "target_basis_w", "samples_without_meter")
MAX_PENDING_SAMPLES = 100_000
ERROR_LOG_EVERY_S = 60.0


class JournalError(OSError):
    """The journal cannot be opened or used at all: '<path>: <why>', one line.

    An OSError, so a command that only reads the journal reports it in one line too.
    """


class JournalLocked(JournalError):
    """Another process holds the journal's lock: '<path> is in use by <holder>', one line."""


class JournalLock:
    """An exclusive lock on a journal, held while this object (its open file) lives.

    Attributes:
        path: The lock file, `<journal>.lock` beside the journal.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    def release(self) -> None:
        """Unlock (closing the file does); the process's exit does the same."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def lock_path(journal_path: Path | str) -> Path:
    """The lock file of the journal at `journal_path`: the same name plus `.lock`."""
    return Path(f"{journal_path}.lock")


def lock_journal(journal_path: Path | str, *, holder: str = "") -> JournalLock:
    """Take the journal's exclusive lock for this process, or say who holds it.

    Creates the journal's missing directories and its lock file (as `GridJournal` would
    create the directories), then `flock(LOCK_EX | LOCK_NB)`: never waits. On success the
    lock file holds one line naming this process (pid, host, start time in UTC and
    `holder`, e.g. the command line), for the message a second one prints.

    Raises:
        JournalLocked: another process (or another lock in this one) holds it; the
            message names the holder from the lock file.
        JournalError: the lock file cannot be created or locked (permissions, a
            read-only or missing place): '<lock file>: <why>'.
    """
    path = lock_path(journal_path)
    if Path(journal_path).is_dir():  # no lock file beside a journal that cannot be
        raise JournalError(f"{journal_path} is a directory, not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise JournalError(f"{path}: cannot create the journal's lock file: "
                           f"{(e.strerror or str(e)).lower()}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        held = e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
        who = _holder(fd) if held else ""
        os.close(fd)
        if held:
            raise JournalLocked(
                f"{journal_path} is in use by another mineops controller "
                f"({who or 'its lock file names no holder yet'}; lock {path}): stop it "
                "first, or give this one a site and journal of its own") from None
        raise JournalError(f"{path}: cannot lock the journal: "
                           f"{(e.strerror or str(e)).lower()}") from None
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    line = f"pid {os.getpid()} on {socket.gethostname()}, since {started}"
    line += f", {holder}" if holder else ""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{line}\n".encode(), 0)
    except OSError as e:  # the lock holds; only the note for the next one is missing
        log.warning("grid_journal_lock_holder_not_recorded", path=str(path),
                    error=e.strerror or str(e))
    return JournalLock(path, fd)


def _holder(fd: int) -> str:
    """The holder's line from a lock file ('' if none yet: it is written just after locking)."""
    for _ in range(10):
        with contextlib.suppress(OSError):
            text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            if text:
                return text.splitlines()[0]
        time.sleep(0.01)
    return ""


@dataclass(slots=True)
class EventRow:
    """One journaled obligation and its compliance tallies.

    Power in W (site power incl. aux), times in Unix s. `baseline_w` is the site meter's
    reading when the event took effect, None when no reading was fresh ("no meter data");
    `target_basis_w` is what a shed_kw target was computed from: that reading, or without
    one the least the site could have drawn. Samples after the deadline count only meter
    readings; those without one are `samples_without_meter`.
    """

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
    version: int | None = None  # the event's revision (GridEvent.version)
    target_basis_w: float | None = None
    samples_without_meter: int = 0

    @property
    def complied(self) -> bool | None:
        """None until the deadline has passed with at least one meter sample."""
        if self.samples_after_deadline == 0:
            return None
        return self.violations == 0


def _connect(path: Path, *, create: bool) -> sqlite3.Connection:
    """An SQLite connection that has proved it can write (BEGIN IMMEDIATE takes the lock).

    create=False (a check) opens an existing file as it is: no WAL switch, no new file.
    """
    uri = f"file:{path.absolute()}?mode={'rwc' if create else 'rw'}"
    db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5.0)
    try:
        if create:
            db.execute("PRAGMA journal_mode=WAL")
        db.execute("BEGIN IMMEDIATE")
        db.execute("ROLLBACK")
    except BaseException:
        db.close()
        raise
    return db


def _why(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, sqlite3.DatabaseError) and "not a database" in text:
        return f"{text} (not an SQLite journal: point grid.journal_path at a new file)"
    if "readonly" in text or "read-only" in text:
        return f"{text} (the file, its directory or its -wal/-shm files are not writable)"
    return text


def journal_problem(path: Path | str) -> str | None:
    """Why the journal at `path` cannot be used for writing, or None; changes nothing.

    An existing file is opened read-write and a write lock is taken and released, so a
    file that is not an SQLite database, is damaged, or cannot be written (permissions,
    an immutable flag, a read-only mount, unwritable -wal/-shm files) is found here.
    A missing file is created as `GridJournal` creates it (directories, the database in
    WAL mode, a write lock) and removed again with whatever was created for it: places
    that only refuse the creation itself (/proc or /sys, even to root) are found too.
    """
    path = Path(path)
    if path.is_dir():
        return None
    if not path.exists():
        return _creation_problem(path)
    try:
        db = _connect(path, create=False)
    except (sqlite3.Error, OSError) as e:
        return f"{path}: {_why(e)}"
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "events" not in tables:
            return f"{path}: an SQLite database, but not a grid journal (tables: " \
                   f"{', '.join(sorted(tables))})"
        bad = db.execute("PRAGMA quick_check").fetchone()[0]
        if bad != "ok":
            return f"{path}: damaged ({bad})"
    except sqlite3.Error as e:
        return f"{path}: {_why(e)}"
    finally:
        db.close()
    return None


def _creation_problem(path: Path) -> str | None:
    """Why GridJournal could not create `path`, found by creating it and removing it again."""
    made: list[Path] = []
    files = [Path(f"{path}{suffix}") for suffix in ("-wal", "-shm", "-journal", "")]
    ours = [f for f in files if not f.exists()]  # leave whatever was there before
    try:
        missing = []
        parent = path.absolute().parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for d in reversed(missing):
            d.mkdir()
            made.append(d)
        _connect(path, create=True).close()
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        return f"{path}: cannot be created: {(e.strerror or str(e)).lower()}{where}"
    except sqlite3.Error as e:
        return f"{path}: cannot be created here: {_why(e)}"
    finally:
        for f in ours:
            with contextlib.suppress(OSError):
                f.unlink()
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()
    return None


class GridJournal:
    """The journal file: queued writes, flushed at once and retried until durable.

    Args:
        path: The SQLite file (`grid.journal_path`), created with its tables if absent.

    Raises:
        JournalError: the file cannot be opened for writing (see `journal_problem`).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = _connect(self.path, create=True)
            self._db.execute("PRAGMA synchronous=FULL")  # an accepted event survives power loss
            self._db.executescript(_SCHEMA)
            have = {r[1] for r in self._db.execute("PRAGMA table_info(events)")}
            for name, sql_type in _ADDED:
                if name not in have:
                    self._db.execute(f"ALTER TABLE events ADD COLUMN {name} {sql_type}")
        except (sqlite3.Error, OSError) as e:
            raise JournalError(f"{self.path}: {_why(e)}") from None
        # Not yet durable: each event's latest state (with its updated_ts), then samples.
        self._rows: dict[str, tuple[EventRow, float]] = {}
        self._samples: list[tuple[str, float, float | None, float, float]] = []
        self.samples_dropped = 0
        self.write_errors = 0
        self.last_error: str | None = None
        self._logged_at = -float("inf")

    def close(self) -> None:
        """Write what is pending (`flush`), then close the database."""
        self.flush()
        self._db.close()

    # -- writing --------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Records (event states and samples) held in memory, not yet on disk."""
        return len(self._rows) + len(self._samples)

    def save(self, row: EventRow, now_ts: float, *, flush: bool = True) -> bool:
        """Record an event's whole state (new or changed); True once it is on disk.

        flush=False only queues it, for the next `flush()` (several changes, one commit).
        """
        self._rows.pop(row.id, None)  # re-queued last: rows stay in the order they changed
        self._rows[row.id] = (replace(row, payload=dict(row.payload)), now_ts)
        return self.flush() if flush else False

    def add_sample(self, event_id: str, ts: float, meter_w: float | None, target_w: float,
                   cap_w: float) -> None:
        """Queue one compliance sample (meter_w None: no meter data); written by `flush`."""
        self._samples.append((event_id, ts, meter_w, target_w, cap_w))
        if len(self._samples) > MAX_PENDING_SAMPLES:
            drop = len(self._samples) - MAX_PENDING_SAMPLES
            del self._samples[:drop]
            self.samples_dropped += drop

    def flush(self) -> bool:
        """Write everything queued in one transaction; False (kept queued) if the disk refuses."""
        if not self._rows and not self._samples:
            return True
        rows = [(r.id, r.kind, json.dumps(r.payload, sort_keys=True), r.received_ts, r.status,
                 r.baseline_w, r.target_w, r.reached_ts, r.curtailed_wh, r.violations,
                 r.samples_after_deadline, r.version, r.target_basis_w,
                 r.samples_without_meter, ts) for r, ts in self._rows.values()]
        samples = list(self._samples)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    f"INSERT INTO events ({', '.join(_COLUMNS)}, updated_ts) "
                    f"VALUES ({', '.join('?' * (len(_COLUMNS) + 1))}) "
                    "ON CONFLICT(id) DO UPDATE SET "
                    + ", ".join(f"{c} = excluded.{c}" for c in (*_COLUMNS[1:], "updated_ts")),
                    rows)
                self._db.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, ?)", samples)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            self._failed(e)
            return False
        self._rows.clear()
        del self._samples[:len(samples)]
        if self.last_error is not None:
            log.info("grid_journal_durable_again", path=str(self.path),
                     write_errors=self.write_errors)
            self.last_error = None
        return True

    def _failed(self, e: sqlite3.Error) -> None:
        self.write_errors += 1
        why = _why(e)
        now = time.monotonic()
        if why != self.last_error or now - self._logged_at >= ERROR_LOG_EVERY_S:
            self._logged_at = now
            log.error("grid_journal_write_failed", path=str(self.path), error=why,
                      pending_records=self.pending, write_errors=self.write_errors,
                      hint="events are obeyed from memory and written once the disk allows")
        self.last_error = why

    # -- reading --------------------------------------------------------------------

    def rows(self, *, open_only: bool = False) -> list[EventRow]:
        """Every event (or the scheduled and active ones), what is queued included."""
        where = " WHERE status IN ('scheduled', 'active')" if open_only else ""
        cur = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM events{where} "
                               "ORDER BY received_ts, id")
        names = [f.name for f in fields(EventRow)]
        found = {}
        for r in cur.fetchall():
            values = dict(zip(_COLUMNS, r, strict=True))
            values["payload"] = json.loads(values["payload"])
            values["samples_without_meter"] = values["samples_without_meter"] or 0
            found[r[0]] = EventRow(**{n: values[n] for n in names})
        for row, _ in self._rows.values():
            if not open_only or row.status in ("scheduled", "active"):
                found[row.id] = replace(row, payload=dict(row.payload))
            else:
                found.pop(row.id, None)
        return sorted(found.values(), key=lambda r: (r.received_ts, r.id))

    def samples(self, event_id: str) -> list[tuple[float, float | None, float, float]]:
        """(time, meter W or None, target W, cap W) of an event, queued ones included."""
        cur = self._db.execute("SELECT ts, meter_w, target_w, cap_w FROM samples "
                               "WHERE event_id = ? ORDER BY ts", (event_id,))
        out = [(r[0], r[1], r[2], r[3]) for r in cur.fetchall()]
        out += [(ts, m, t, c) for e, ts, m, t, c in self._samples if e == event_id]
        return out
