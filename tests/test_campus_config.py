"""The `[campus]` table: each mistake is caught with a message naming the field and why.

Model checks (`CampusConfig`) hold for any campus; `campus_review` checks the whole
picture against the site's `[[meters]]` and power cap, as check-config would with the
hook of docs/campus.md (exercised here on a SiteConfig subclass).
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field, ValidationError, model_validator

from controller.campus_config import CampusConfig, campus_review
from controller.config import SiteConfig
from controller.site_file import describe_validation_error, load_config
from drivers.meters.mineops import MineopsMeter
from drivers.modbus.config import ModbusDeviceConfig

CAMPUS_TOML = """
[poi]
import_limit_kw = 50000
export_limit_kw = 5000
meter = "poi"

[[firm_loads]]
id = "gpu-hall-1"
meter = "gpu1"
max_kw = 24000
schedule = [
  { start = 2025-06-01T08:00:00Z, end = 2025-06-01T20:00:00Z, kw = 20000 },
  { start = 2025-06-01T20:00:00-05:00, end = 2025-06-02T06:00:00-05:00, kw = 8000 },
]

[[generators]]
id = "solar-1"
kind = "solar"
meter = "pv"
rating_kw = 20000

[[generators]]
id = "genset-1"
kind = "genset"
meter = "genset"
rating_kw = 5000
marginal_cost_usd_per_mwh = 45
reserve_kw = 500
max_load_step_kw = 1500

[battery]
capacity_kwh = 8000
max_charge_kw = 4000
max_discharge_kw = 4000
meter = "bess"

[[modbus]]
id = "gpu1"
host = "10.0.0.21"
model = 203

[[modbus]]
id = "pv"
host = "10.0.0.22"
unit_id = 3

[[modbus]]
id = "genset"
host = "10.0.0.23"
invert_power = false

[[modbus]]
id = "bess"
host = "10.0.0.24"
soc_model = 802
"""
SITE_METERS = [MineopsMeter(id="poi", role="site")]


def campus_data() -> dict[str, Any]:
    return copy.deepcopy(tomllib.loads(CAMPUS_TOML))


def errors_of(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as e:
        CampusConfig.model_validate(data)
    return describe_validation_error(e.value)


def review_of(data: dict[str, Any], **kw: Any) -> tuple[list[str], list[str]]:
    r = campus_review(CampusConfig.model_validate(data), kw.pop("meters", SITE_METERS), **kw)
    return r.errors, r.warnings


def test_the_example_campus_is_valid() -> None:
    campus = CampusConfig.model_validate(campus_data())
    review = campus_review(campus, SITE_METERS, power_cap_kw=30_000)
    assert review.errors == [] and review.warnings == []
    assert review.firm_max_kw == 24_000
    assert review.generation_rating_kw == 25_000
    assert review.genset_firm_kw == 4_500
    assert campus.role_of("gpu1") == "firm_load" and campus.role_of("bess") == "battery"
    assert campus.role_of("poi") == "poi" and campus.role_of("nothing") is None
    solar = campus.generators[0]
    assert solar.marginal_cost_usd_per_mwh == 0.0 and solar.firm_kw == 0.0


# -- one entry at a time ----------------------------------------------------------------


def test_unknown_key_and_nan_are_errors() -> None:
    data = campus_data()
    data["poi"]["import_limit_mw"] = 50
    data["battery"]["capacity_kwh"] = float("nan")
    out = errors_of(data)
    assert "poi.import_limit_mw: unknown key" in out
    assert "battery.capacity_kwh: Input should be a finite number" in out


def test_genset_needs_its_reserve_and_load_step() -> None:
    data = campus_data()
    del data["generators"][1]["reserve_kw"]
    del data["generators"][1]["max_load_step_kw"]
    assert "a genset needs reserve_kw and max_load_step_kw" in errors_of(data)


def test_only_a_genset_has_reserve_and_load_step() -> None:
    data = campus_data()
    data["generators"][0]["max_load_step_kw"] = 1000
    assert "max_load_step_kw: only a genset has these (this generator is solar)" in \
        errors_of(data)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("reserve_kw", 5000, "reserve_kw (5000 kW) must be below rating_kw (5000 kW)"),
    ("max_load_step_kw", 6000, "max_load_step_kw (6000 kW) is above rating_kw (5000 kW)"),
])
def test_genset_fields_within_its_rating(field: str, value: float, message: str) -> None:
    data = campus_data()
    data["generators"][1][field] = value
    assert message in errors_of(data)


def test_schedule_times_need_a_time_zone() -> None:
    data = tomllib.loads(CAMPUS_TOML.replace("2025-06-01T08:00:00Z", "2025-06-01T08:00:00"))
    out = errors_of(data)
    assert "firm_loads.0.schedule.0.start: give a time zone" in out


@pytest.mark.parametrize(("window", "message"), [
    ({"start": "2025-06-01T10:00:00Z", "end": "2025-06-01T12:00:00Z", "kw": 1000},
     "schedule windows overlap"),
    ({"start": "2025-06-03T10:00:00Z", "end": "2025-06-03T09:00:00Z", "kw": 1000},
     "end (2025-06-03T09:00:00+00:00) must be after start"),
    ({"start": "2025-06-03T10:00:00Z", "end": "2025-06-03T12:00:00Z", "kw": 30000},
     "announces 30000 kW, above max_kw (24000 kW)"),
])
def test_schedule_mistakes(window: dict[str, Any], message: str) -> None:
    data = campus_data()
    data["firm_loads"][0]["schedule"].append(window)
    assert message in errors_of(data)


def test_ids_and_meters_are_used_once() -> None:
    data = campus_data()
    data["generators"][0]["id"] = "gpu-hall-1"
    data["battery"]["meter"] = "pv"
    data["modbus"].append({"id": "pv2", "host": "10.0.0.22", "unit_id": 3})
    out = errors_of(data)
    assert "campus.generators: id 'gpu-hall-1' is also used in campus.firm_loads" in out
    assert ("campus.battery.meter: meter 'pv' is already campus.generators[gpu-hall-1].meter's"
            in out)
    assert "campus.modbus: 'pv' and 'pv2' are the same device (10.0.0.22:502 unit 3)" in out


def test_soc_model_only_for_the_battery() -> None:
    data = campus_data()
    data["modbus"][1]["soc_model"] = 802
    assert "modbus device 'pv' sets soc_model, which only a battery reads" in errors_of(data)


def test_modbus_device_fields() -> None:
    with pytest.raises(ValidationError) as e:
        ModbusDeviceConfig(id="x", host="h", timeout_s=20, poll_interval_s=1)
    assert "more than 10 times poll_interval_s" in str(e.value)
    with pytest.raises(ValidationError) as e:
        ModbusDeviceConfig(id="x", host="h", model=160)  # type: ignore[arg-type]
    assert "model" in describe_validation_error(e.value)
    with pytest.raises(ValidationError):
        ModbusDeviceConfig(id="x", host="h", unit_id=256)


def test_battery_soc_window() -> None:
    data = campus_data()
    data["battery"]["min_soc_fraction"] = 0.9
    data["battery"]["max_soc_fraction"] = 0.1
    assert "min_soc_fraction (0.9) must be below max_soc_fraction (0.1)" in errors_of(data)


# -- the whole picture ------------------------------------------------------------------


def test_unknown_meter_with_a_suggestion() -> None:
    data = campus_data()
    data["firm_loads"][0]["meter"] = "gpu-1"
    errors, _ = review_of(data)
    assert errors[0] == "campus.firm_loads[gpu-hall-1].meter: no meter 'gpu-1'; did you mean " \
        "'gpu1'?"
    assert any("device 'gpu1' is not any campus entry's meter" in w for w in review_of(data)[1])


def test_poi_must_be_the_site_meter() -> None:
    data = campus_data()
    meters = [MineopsMeter(id="poi", role="aux"), MineopsMeter(id="main", role="site")]
    errors, _ = review_of(data, meters=meters)
    assert errors == ["campus.poi.meter: meter 'poi' has role 'aux'; the POI's meter is the "
                      "one the controller plans against: give it role 'site' (today that is "
                      "'main')"]


def test_a_part_must_not_use_the_site_meter() -> None:
    data = campus_data()
    data["modbus"] = [d for d in data["modbus"] if d["id"] != "gpu1"]
    data["firm_loads"][0]["meter"] = "main"
    data["poi"]["meter"] = "poi-rtu"
    data["modbus"].append({"id": "poi-rtu", "host": "10.0.0.1"})
    errors, warnings = review_of(data, meters=[MineopsMeter(id="main", role="site")])
    assert errors == ["campus.firm_loads[gpu-hall-1].meter: meter 'main' has role 'site': it "
                      "measures the whole site at the POI, not this part; give this part its "
                      "own meter (role 'aux')"]
    assert any("two meters for the POI" in w for w in warnings)


def test_firm_load_alone_over_the_interconnect() -> None:
    data = campus_data()
    data["firm_loads"][0]["max_kw"] = 60_000
    data["firm_loads"][0]["schedule"] = []
    errors, _ = review_of(data)
    assert errors == ["campus.firm_loads: together up to 60000 kW (max_kw), above the import "
                      "limit (campus.poi.import_limit_kw 50000 kW) plus the gensets' 4500 kW "
                      "(rating less reserve): the firm loads alone could overload the "
                      "interconnect, with every miner asleep"]


def test_firm_load_held_by_the_genset_is_a_warning() -> None:
    data = campus_data()
    data["firm_loads"][0]["max_kw"] = 52_000
    errors, warnings = review_of(data)
    assert errors == []
    assert warnings == ["campus.firm_loads: together up to 52000 kW (max_kw), above the "
                        "import limit (campus.poi.import_limit_kw 50000 kW): held only while "
                        "the gensets run"]


def test_firm_load_in_watts() -> None:
    data = campus_data()
    data["firm_loads"][0]["max_kw"] = 24_000_000
    data["firm_loads"][0]["schedule"] = []
    errors, _ = review_of(data)
    assert errors[0].startswith("campus.firm_loads[gpu-hall-1].max_kw: 24000000 kW is 480 "
                                "times the import limit")
    assert "looks like W typed as kW (24000000 W = 24000 kW)" in errors[0]


def test_generation_rating_absurd_against_the_interconnect() -> None:
    data = campus_data()
    data["generators"][0]["rating_kw"] = 20_000_000  # 20 MW typed in W
    errors, _ = review_of(data)
    assert errors == ["campus.generators[solar-1].rating_kw: 20000000 kW is 400 times the "
                      "interconnect (50000 kW): looks like W typed as kW (20000000 W = "
                      "20000 kW)"]
    data["generators"][0]["rating_kw"] = 600_000  # a stranded wind farm, or a slip
    errors, warnings = review_of(data)
    assert errors == []
    assert warnings == ["campus.generators[solar-1].rating_kw: 600000 kW is 12 times the "
                        "interconnect (50000 kW): right for generation behind a small "
                        "connection, a unit slip otherwise"]
    data["generators"][0]["rating_kw"] = 20  # 20 MW typed as 20
    errors, warnings = review_of(data)
    assert errors == []
    assert warnings == ["campus.generators[solar-1].rating_kw: 20 kW is 1/2500 of the "
                        "interconnect (50000 kW): is it in MW? (20 MW = 20000 kW)"]


def test_battery_units() -> None:
    data = campus_data()
    data["battery"]["capacity_kwh"] = 8  # 8 MWh typed as 8
    errors, _ = review_of(data)
    assert errors == ["campus.battery.capacity_kwh: 8 kWh empties in 0.002 h at "
                      "max_discharge_kw (4000 kW): batteries run 3 min to 100 h; kWh and MWh "
                      "(or kW and MW) mixed up?"]
    data = campus_data()
    data["battery"]["max_charge_kw"] = 40_000_000
    errors, _ = review_of(data)
    assert ("campus.battery.max_charge_kw: 40000000 kW is 800 times the import limit "
            "(campus.poi.import_limit_kw 50000 kW): looks like W typed as kW (40000000 W = "
            "40000 kW)") in errors


def test_export_limit_checks() -> None:
    data = campus_data()
    data["poi"]["import_limit_kw"] = 5_000
    data["poi"]["export_limit_kw"] = 5_000_000  # 5 MW typed in W
    data["firm_loads"] = []
    data["generators"][0]["rating_kw"] = 4_000
    errors, _ = review_of(data)
    assert errors == ["campus.poi.export_limit_kw: 5000000 kW is 1000 times the import limit "
                      "(campus.poi.import_limit_kw 5000 kW): looks like W typed as kW "
                      "(5000000 W = 5000 kW)"]
    data = {"poi": {"import_limit_kw": 1000, "export_limit_kw": 500, "meter": "poi"}}
    errors, warnings = review_of(data)
    assert errors == []
    assert warnings == ["campus.poi.export_limit_kw: 500 kW, but nothing on the campus "
                        "generates: the site can never export"]


def test_power_cap_against_the_import_limit() -> None:
    errors, _ = review_of(campus_data(), power_cap_kw=50)  # MW typed as kW
    assert errors == ["power_cap_kw: 50 kW is 1/1000 of the import limit "
                      "(campus.poi.import_limit_kw 50000 kW): one of them is in the wrong unit"]
    errors, warnings = review_of(campus_data(), power_cap_kw=60_000)
    assert errors == []
    assert warnings == ["power_cap_kw: 60000 kW is above the import limit "
                        "(campus.poi.import_limit_kw 50000 kW): the interconnect binds "
                        "before the cap does"]


def test_free_genset_fuel_is_questioned() -> None:
    data = campus_data()
    data["generators"][1]["marginal_cost_usd_per_mwh"] = 0
    _, warnings = review_of(data)
    assert warnings == ["campus.generators[genset-1].marginal_cost_usd_per_mwh: 0 $/MWh for "
                        "a genset: its fuel is free? (flare gas may be; pipeline gas and diesel "
                        "are not)"]


# -- the hook into SiteConfig (docs/campus.md) ------------------------------------------


class CampusSite(SiteConfig):
    """SiteConfig with the campus hook proposed for controller/config.py."""

    campus: CampusConfig | None = Field(default=None)

    @model_validator(mode="after")
    def _check_campus(self) -> CampusSite:
        if self.campus is not None:
            review = campus_review(self.campus, self.meters, self.power_cap_kw)
            if review.errors:
                raise ValueError("\n".join(review.errors))
        return self


def site(campus: dict[str, Any]) -> dict[str, Any]:
    return {"site_id": "s", "fleet": {"groups": [{"name": "r1", "model": "s21", "count": 40}]},
            "meters": [{"type": "mineops", "id": "poi", "role": "site"}],
            "power_cap_kw": 30_000, "hashprice_usd_per_ph_day": 42.0, "campus": campus}


def test_hook_accepts_a_good_campus_and_rejects_a_bad_one() -> None:
    cfg = CampusSite.model_validate(site(campus_data()))
    assert cfg.campus is not None and cfg.campus.poi.import_limit_kw == 50_000
    bad = campus_data()
    bad["poi"]["meter"] = "poi-meter"
    with pytest.raises(ValidationError) as e:
        CampusSite.model_validate(site(bad))
    assert "campus.poi.meter: no meter 'poi-meter'" in describe_validation_error(e.value)


def test_the_example_site_file_s_campus_section_uncommented_is_valid(tmp_path: Any) -> None:
    """deploy/site.example.toml carries a commented [campus]: uncommented, the site loads
    and its campus is the one the comments describe (an example that drifted would fail)."""
    example = Path(__file__).resolve().parents[1] / "deploy" / "site.example.toml"
    text = example.read_text()
    start = text.index("# [campus.poi]")
    body = "\n".join(line[2:] if line.startswith("# ") else line
                     for line in text[start:].splitlines())
    path = tmp_path / "site.toml"
    path.write_text(text[:start] + body + "\n")
    cfg = load_config(path)
    assert cfg.campus is not None
    assert cfg.campus.poi.import_limit_kw == 50000
    assert [g.id for g in cfg.campus.generators] == ["solar-1"]
    assert {d.id for d in cfg.campus.modbus} == {"gpu1", "pv"}
