"""Prometheus series of an energy campus: headroom, firm load, generation, net import, battery.

`CampusCollector` is registered beside the site's collector (controller/daemon/metrics.py)
when the site file has a `[campus]` table. Like it, it renders at scrape time from the
latest `DecisionSnapshot` (its `campus` part: what the decision saw) and leaves out what
the controller does not know: no net import without a fresh POI reading, no state of
charge without one, nothing before the first decision. Counts of readings and of failed
Modbus polls come from the `CampusLink` itself.

Series (W incl. the miners' aux load where they are the miners'; each one's help text
says what it is; the list with the alert is in docs/campus.md):

- `mineops_campus_headroom_watts`: what the miners may plan under from the campus;
  `mineops_campus_limit_watts`: their share of the POI limit before the margin;
- `mineops_campus_import_limit_watts` (the interconnect's), `mineops_campus_poi_limit_watts`
  (in force: the interconnect's or a lower grid target), `mineops_campus_net_import_watts`;
- `mineops_campus_firm_load_watts{part}`, `mineops_campus_generation_watts{part,kind}`,
  `mineops_campus_battery_power_watts`, each as counted; `mineops_campus_part_stale{part}`;
- `mineops_campus_battery_soc_ratio`, `mineops_campus_on_site_supply_watts`,
  `mineops_campus_marginal_price_usd_per_mwh`, `mineops_campus_islanded`;
- `mineops_campus_readings_total{meter}`, `mineops_campus_readings_dropped_total
  {meter,reason}`, `mineops_campus_modbus_poll_failures_total{device,reason}`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.daemon.campus import CampusLink
from controller.daemon.snapshot import DecisionSnapshot


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class CampusCollector(Collector):
    """A campus's series from the latest decision snapshot; see the module docstring.

    Args:
        link: The controller's campus link (readings and polls counted there).
        snapshot: Returns the latest decision snapshot (None before the first decision).
    """

    def __init__(self, *, link: CampusLink,
                 snapshot: Callable[[], DecisionSnapshot | None]) -> None:
        self._link = link
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        """Every campus series of one scrape (prometheus_client's Collector protocol)."""
        yield from self._counters()
        snap = self._snapshot()
        c = None if snap is None else snap.campus
        if snap is None or c is None:
            return
        yield _gauge("mineops_campus_headroom_watts",
                     "What the miners may plan under from the campus, incl. their aux load",
                     c.cap_w)
        yield _gauge("mineops_campus_limit_watts",
                     "The miners' share of the POI limit (islanded: of the gensets) before "
                     "the margin", c.limit_w)
        yield _gauge("mineops_campus_import_limit_watts",
                     "The interconnect's import limit (campus.poi.import_limit_kw)",
                     c.import_limit_w)
        if c.poi_limit_w is not None:
            yield _gauge("mineops_campus_poi_limit_watts",
                         "Import limit in force at the POI: the interconnect's or a grid "
                         "target", c.poi_limit_w)
        if c.net_import_w is not None:
            yield _gauge("mineops_campus_net_import_watts",
                         "Net import at the POI meter (export negative)", c.net_import_w)
        firm = GaugeMetricFamily("mineops_campus_firm_load_watts",
                                 "Each firm load as counted (its max_kw when stale)",
                                 labels=["part"])
        generation = GaugeMetricFamily("mineops_campus_generation_watts",
                                       "Each generator as counted (0 when stale)",
                                       labels=["part", "kind"])
        stale = GaugeMetricFamily("mineops_campus_part_stale",
                                  "1 while a campus part is counted at its worst case",
                                  labels=["part"])
        for p in c.parts:
            if p.role == "firm_load":
                firm.add_metric([p.id], p.counted_w)
            elif p.role == "generator":
                generation.add_metric([p.id, p.kind], p.counted_w)
            else:
                yield _gauge("mineops_campus_battery_power_watts",
                             "The battery as counted, discharge positive (charging at its "
                             "limit when stale)", p.counted_w)
            stale.add_metric([p.id], 1.0 if p.stale else 0.0)
        yield firm
        yield generation
        yield stale
        if c.soc_fraction is not None:
            yield _gauge("mineops_campus_battery_soc_ratio", "Battery state of charge, 0..1",
                         c.soc_fraction)
        yield _gauge("mineops_campus_on_site_supply_watts",
                     "Headroom the on-site surplus and battery supply (not the grid)",
                     c.curve.on_site_w)
        price = c.curve.price_at(max(snap.planned_site_power_w - 1e-6, 0.0))
        if price is not None:
            yield _gauge("mineops_campus_marginal_price_usd_per_mwh",
                         "Price of the miners' last planned watt on the campus cost curve",
                         price)
        yield _gauge("mineops_campus_islanded", "1 while the campus runs islanded",
                     1.0 if c.islanded else 0.0)

    def _counters(self) -> Iterator[Metric]:
        readings = CounterMetricFamily("mineops_campus_readings", "Readings taken per campus meter",
                                       labels=["meter"])
        for meter in sorted(self._link.roles):
            readings.add_metric([meter], float(self._link.received[meter]))
        yield readings
        failures = CounterMetricFamily("mineops_campus_modbus_poll_failures",
                                       "Failed SunSpec polls per device and reason",
                                       labels=["device", "reason"])
        for device, poller in sorted(self._link.pollers.items()):
            for reason, n in sorted(poller.failures.items()):
                failures.add_metric([device, reason], float(n))
        yield failures
        dropped = CounterMetricFamily("mineops_campus_readings_dropped",
                                      "Campus readings dropped per meter and reason",
                                      labels=["meter", "reason"])
        for (meter, reason), n in sorted(self._link.dropped.items()):
            dropped.add_metric([meter, reason], float(n))
        yield dropped
