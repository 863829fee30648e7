"""An event's standing for the operator and for settlement: scheduled, in progress, judged.

Judged only once the event has ended, from the compliance tallies the obligations keep
(samples after the deadline, violations); never when its deadline was already past when
it arrived (the site had no chance to meet it).
"""

from __future__ import annotations

from controller.grid.journal import EventRow


def deadline_ts(row: EventRow) -> float | None:
    """By when the event's target must be met (its start unless it names a deadline)."""
    p = row.payload
    value = p.get("deadline_ts") or p.get("start_ts")
    return None if value is None else float(value)


def late_s(row: EventRow) -> float | None:
    """How long after its deadline the event reached the controller (None: in time)."""
    deadline = deadline_ts(row)
    if row.kind == "frequency" or deadline is None or row.received_ts <= deadline:
        return None
    return row.received_ts - deadline


def compliance(row: EventRow, now_ts: float) -> str:
    """The event's standing in words: scheduled, in progress, complied, violated, ...

    Judged only once the event has ended, and not at all when its deadline was past at
    arrival (the site had no chance to meet it).
    """
    p = row.payload
    if row.status == "cancelled":
        return "cancelled"
    if row.kind == "frequency":
        return "in progress" if row.status == "active" else "restored"
    end = p.get("end_ts")
    late = late_s(row)
    if row.status in ("scheduled", "active") and (end is None or now_ts < end):
        start = p.get("start_ts")
        if row.status == "scheduled" and (start is None or now_ts < start):
            return "scheduled"
        return "in progress" + (f" (deadline past at arrival by {late:.0f} s)" if late else "")
    if late is not None:
        return f"deadline past at arrival by {late:.0f} s: not judged"
    if row.samples_after_deadline == 0:
        return "not judged: no meter samples after the deadline"
    if row.violations:
        return (f"violated: {row.violations} of {row.samples_after_deadline} samples over "
                "the target")
    return "complied"


def complied(row: EventRow, now_ts: float) -> bool | None:
    """True/False once an ended event is judged (see `compliance`); None otherwise."""
    text = compliance(row, now_ts)
    if text == "complied":
        return True
    return False if text.startswith("violated") else None
