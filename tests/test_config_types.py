"""The site file's shared checks (controller/config_types.py): each written once, used by
the site's own tables, the campus table and the device tables beside the drivers."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from controller.config import FrequencyConfig, PolicyConfig
from controller.config_types import unit_slip


def test_unit_slip_names_the_unit_meant() -> None:
    assert unit_slip("x_kw", 3_600_000, "the fleet (3600 kW)", 3600) == (
        "x_kw: 3600000 kW is 1000 times the fleet (3600 kW): looks like W typed as kW "
        "(3600000 W = 3600 kW)")
    assert unit_slip("x_kw", 3.6, "the fleet (3600 kW)", 3600) == (
        "x_kw: 3.6 kW is 1/1000 of the fleet (3600 kW): looks like MW typed as kW "
        "(3.6 MW = 3600 kW)")
    assert unit_slip("x_kw", 3.6, "the fleet (3600 kW)", 3600, below=False) is None
    # Within a factor of 100 either way a value is plausible.
    assert unit_slip("x_kw", 359_000, "the fleet (3600 kW)", 3600) is None
    assert unit_slip("x_kw", 37, "the fleet (3600 kW)", 3600) is None


def errors(e: pytest.ExceptionInfo[ValidationError]) -> list[tuple[tuple[str | int, ...], str]]:
    return [(tuple(x["loc"]), x["msg"]) for x in e.value.errors()]


@pytest.mark.parametrize(("model", "lower", "upper", "message"), [
    (PolicyConfig, ("derate_start_c", 90.0), ("critical_c", 85.0),
     "must be above derate_start_c (90 C): the derating ramp runs from derate_start_c up to "
     "critical_c"),
    (FrequencyConfig, ("shed_below_hz", 59.7), ("restore_above_hz", 59.7),
     "must be above shed_below_hz (59.7 Hz): at or below it the site would restore while "
     "the grid is still low enough to shed"),
])
def test_a_field_must_be_above_the_one_before(model: type, lower: tuple[str, float],
                                              upper: tuple[str, float], message: str) -> None:
    with pytest.raises(ValidationError) as e:
        model(**dict([lower, upper]))
    assert errors(e) == [((upper[0],), f"Value error, {message}")]
    ok = model(**{lower[0]: lower[1], upper[0]: lower[1] + 0.1})
    assert getattr(ok, upper[0]) == pytest.approx(lower[1] + 0.1)


def test_a_lower_field_that_failed_is_reported_once() -> None:
    # derate_start_c fails its own bound: critical_c is not also blamed for it.
    with pytest.raises(ValidationError) as e:
        PolicyConfig(derate_start_c=200, critical_c=95)
    assert errors(e) == [(("derate_start_c",), "Input should be less than or equal to 150")]
