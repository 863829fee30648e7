"""The controller's campus link (controller/daemon/campus.py) without a network: signs of
MQTT meter readings, the decision asked for at once, the genset's frequency, the Modbus
POI as the site meter, and the cap in force with its source."""

from __future__ import annotations

from typing import Any

import pytest

from controller.campus_config import CampusConfig
from controller.core.prices import PriceInForce
from controller.daemon.campus import CampusLink, campus_cap
from controller.daemon.snapshot import CapInForce
from controller.grid.obligations import Obligation
from controller.protocol.payloads import MeterTelemetry
from drivers.modbus import DeviceReading

NOW = 1_750_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = NOW

    def __call__(self) -> float:
        return self.t


def campus(islanded: bool = False) -> CampusConfig:
    return CampusConfig.model_validate({
        "poi": {"import_limit_kw": 1000.0, "meter": "poi-meter", "islanded": islanded},
        "firm_loads": [{"id": "gpu-hall", "meter": "gpu", "max_kw": 600.0}],
        "generators": [{"id": "solar", "kind": "solar", "meter": "pv", "rating_kw": 500.0},
                       {"id": "genset", "kind": "genset", "meter": "gen", "rating_kw": 800.0,
                        "marginal_cost_usd_per_mwh": 45.0, "reserve_kw": 80.0,
                        "max_load_step_kw": 200.0}],
        "modbus": [{"id": "poi-meter", "host": "127.0.0.1"}],
    })


class Recorder:
    def __init__(self) -> None:
        self.changes: list[str] = []
        self.site: list[MeterTelemetry] = []
        self.hz: list[float] = []


def link(c: CampusConfig | None = None) -> tuple[CampusLink, Recorder, Clock]:
    rec, clock = Recorder(), Clock()
    out = CampusLink(c or campus(), stale_s=10.0, margin_fraction=0.01,
                     on_change=rec.changes.append, on_site_meter=rec.site.append,
                     on_frequency=rec.hz.append, clock=clock)
    return out, rec, clock


def meter(kw: float, **kw_args: Any) -> MeterTelemetry:
    return MeterTelemetry(ts=NOW, power_w=kw * 1000.0, **kw_args)


PRICE = PriceInForce(40.0, "real_time", 8.0)


def test_mqtt_meters_are_turned_to_their_roles_sign() -> None:
    lk, _, _ = link()
    assert lk.on_meter("gpu", meter(300))
    # A meter on the solar feeder counts the output as export (negative): turned positive.
    assert lk.on_meter("pv", meter(-200))
    assert not lk.on_meter("someone-elses", meter(5))
    p = lk.picture(market_usd_per_mwh=40.0, adders_usd_per_mwh=8.0)
    assert p.firm_load_w == 300e3 and p.generation_w == 200e3
    assert lk.received["gpu"] == 1 and lk.received["pv"] == 1
    assert lk.pollers.keys() == {"poi-meter"}


def test_a_decision_is_asked_for_once_when_the_plan_no_longer_fits() -> None:
    lk, rec, _ = link()
    lk.on_meter("gpu", meter(300))
    lk.on_meter("pv", meter(-200))
    p = lk.picture(market_usd_per_mwh=40.0, adders_usd_per_mwh=8.0)
    assert p.cap_w == pytest.approx(1000e3 + 200e3 - 300e3 - 10e3)
    lk.decided(p, market_usd_per_mwh=40.0, adders_usd_per_mwh=8.0, poi_limit_w=None,
               planned_w=880e3)
    lk.on_meter("gpu", meter(305))  # 5 kW more: the 880 kW plan still fits (885 kW)
    assert rec.changes == []
    lk.on_meter("gpu", meter(330))  # +25 kW (and as much again counted ahead): it does not
    assert rec.changes == ["campus"]
    lk.on_meter("gpu", meter(360))  # asked already; the decision sets a new basis
    assert rec.changes == ["campus"]
    p = lk.picture(market_usd_per_mwh=40.0, adders_usd_per_mwh=8.0)
    lk.decided(p, market_usd_per_mwh=40.0, adders_usd_per_mwh=8.0, poi_limit_w=None,
               planned_w=p.cap_w)
    lk.on_meter("pv", meter(-400))  # a cloud passed: 200 kW more headroom, use it now
    assert rec.changes == ["campus", "campus"]


def test_a_modbus_poi_is_the_site_meter_and_an_islanded_genset_the_frequency() -> None:
    lk, rec, _ = link()
    lk.on_device(DeviceReading("poi-meter", "poi", NOW, power_w=750e3, frequency_hz=59.98,
                               energy_wh=1e6, energy_reverse_wh=2e5))
    (site,) = rec.site
    assert (site.power_w, site.frequency_hz, site.energy_import_wh) == (750e3, 59.98, 1e6)
    lk.on_meter("gen", meter(-300, frequency_hz=59.5))
    assert rec.hz == []  # grid-connected: the site meter gives the grid's frequency
    # An unavailable device is not a reading of 0 W.
    lk.on_device(DeviceReading("poi-meter", "poi", NOW, available=False))
    assert len(rec.site) == 1
    # A value the site meter's checks refuse (30 Hz): dropped, counted, nothing raised.
    lk.on_device(DeviceReading("poi-meter", "poi", NOW, power_w=1.0, frequency_hz=30.0))
    assert len(rec.site) == 1
    assert lk.dropped[("poi-meter", "site_meter_invalid")] == 1
    island, rec_i, _ = link(campus(islanded=True))
    island.on_meter("gen", meter(-300, frequency_hz=59.5))
    assert rec_i.hz == [59.5]
    island.on_device(DeviceReading("poi-meter", "poi", NOW, power_w=0.0, frequency_hz=59.5))
    assert rec_i.site[0].frequency_hz is None  # islanded, the POI sees no grid


def base(source: str = "site") -> CapInForce:
    return CapInForce(site_w=2e6, in_force_w=2e6, planning_w=2e6 * 0.99, source=source)  # type: ignore[arg-type]


def test_the_cap_in_force_takes_the_campus_and_says_why() -> None:
    lk, _, _ = link()
    lk.on_meter("gpu", meter(300))
    lk.on_meter("pv", meter(-200))
    no_event = Obligation(float("inf"), None, None, None)
    cap, p = lk.cap_in_force(base(), no_event, PRICE, None)
    assert cap.source == "campus"
    assert cap.planning_w == pytest.approx(p.cap_w) == pytest.approx(890e3)
    assert cap.in_force_w == pytest.approx(900e3)
    # A grid target of 600 kW on net import: the POI limit, and its source.
    target = Obligation(600e3, None, None, None)
    cap, p = lk.cap_in_force(base("recovery"), target, PRICE, None)
    assert p.poi_limit_w == 600e3
    assert cap.planning_w == pytest.approx(600e3 - 100e3 - 6e3)
    assert cap.source == "recovery"
    # An under-frequency shed keeps its source; a campus looser than the site cap: "site".
    assert campus_cap(base("frequency"), p, headroom_fraction=0.01,
                      poi_source="site").source == "frequency"
    small = CapInForce(site_w=100e3, in_force_w=100e3, planning_w=99e3, source="site")
    assert campus_cap(small, p, headroom_fraction=0.01, poi_source="site").source == "site"
    island, _, _ = link(campus(islanded=True))
    island.on_meter("gpu", meter(100))
    island.on_meter("gen", meter(-150))
    cap, p = island.cap_in_force(base(), no_event, PRICE, None)
    assert cap.source == "islanded"
    assert cap.planning_w == pytest.approx(50e3 + 200e3)  # what the miners draw + one step
