"""The site clock of the live view: wall-clock Unix times shown as the site's time.

A real site's clock is the wall clock in the site's zone. The demo's is a simulated
clock that runs `speed` times faster on the price trace's timeline: at 60x, a decision
taken 10 real seconds after the anchor is shown 10 simulated minutes later. The
controller itself only ever sees wall-clock times (payloads carry Unix seconds); a
simulated site's controller puts its site time in the decision summary (`site_ts`,
`site_speed`, `site_timezone`), and `SiteClock.of_summary` reads it back, so the demo's
own view and `mineops top` watching it show the same times.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from controller.protocol.payloads import DecisionSummary


def zone(name: str | None) -> tzinfo:
    """The IANA zone `name`, or this machine's local zone when None.

    Raises:
        ValueError: `name` is not an IANA zone name (message names it).
    """
    if name is None:
        local = datetime.now().astimezone().tzinfo
        return local if local is not None else UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as "
                         "America/Chicago or UTC)") from None


@dataclass(frozen=True, slots=True)
class SiteClock:
    """Maps wall-clock Unix seconds to the site's time.

    site time = anchor_site_s + (wall - anchor_wall_s) * speed, shown in `tz`.
    `simulated` says the clock is not the wall clock (the demo), which the view states.
    """

    tz: tzinfo
    speed: float = 1.0
    anchor_wall_s: float = 0.0
    anchor_site_s: float = 0.0
    simulated: bool = False

    @classmethod
    def wall(cls, tz: tzinfo) -> SiteClock:
        """The wall clock in `tz` (a real site)."""
        return cls(tz)

    @classmethod
    def simulated_at(cls, *, site_s: float, wall_s: float, speed: float,
                     tz: tzinfo) -> SiteClock:
        """A simulated clock that reads `site_s` at wall time `wall_s` and runs at `speed`."""
        return cls(tz, speed=speed, anchor_wall_s=wall_s, anchor_site_s=site_s,
                   simulated=True)

    @classmethod
    def of_summary(cls, summary: DecisionSummary | None, tz: tzinfo, *,
                   tz_given: bool = False) -> SiteClock:
        """The clock of the controller that published `summary`.

        Simulated when the summary carries its site time (anchored at the decision: the
        summary's `ts` reads `site_ts`), else the wall clock. Shown in the summary's zone
        when it names one, unless `tz_given` (an operator's --timezone) says to use `tz`;
        `tz` is also the zone when the summary names none (or one this machine lacks).
        """
        if summary is None:
            return cls.wall(tz)
        shown = tz
        if summary.site_timezone is not None and not tz_given:
            try:
                shown = ZoneInfo(summary.site_timezone)
            except (ZoneInfoNotFoundError, ValueError):
                shown = tz
        if summary.site_ts is None:
            return cls.wall(shown)
        return cls.simulated_at(site_s=summary.site_ts, wall_s=summary.ts,
                                speed=summary.site_speed or 1.0, tz=shown)

    def site_s(self, wall_s: float) -> float:
        """The site time (Unix s on the site's timeline) at wall time `wall_s`."""
        return self.anchor_site_s + (wall_s - self.anchor_wall_s) * self.speed

    def at(self, wall_s: float) -> datetime:
        """Wall time `wall_s` (Unix s) as an aware datetime on the site's clock."""
        return datetime.fromtimestamp(self.site_s(wall_s), UTC).astimezone(self.tz)

    def describe(self) -> str:
        """What kind of clock this is, for the view ("" for the wall clock)."""
        return f"simulated, {self.speed:g}x real time" if self.simulated else ""
