"""The miner-model catalogue: data validated on load, facts that match the vendors' figures."""

from __future__ import annotations

from datetime import UTC
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from controller.catalogue import MinerModel, breakeven_label, load_catalogue, operating_points

REQUIRED = ("s19j_pro", "s19_xp", "s21", "s21_pro", "s21_xp", "s21_xp_hydro", "s23_hydro", "m60s")


def test_catalogue_has_the_fleet_we_promise() -> None:
    cat = load_catalogue()
    assert set(REQUIRED) <= set(cat.models)
    assert cat.get("s23_hydro").efficiency_j_per_th < 10  # the sub-10 J/TH generation
    assert cat.get("s21").efficiency_j_per_th == pytest.approx(17.5)


def test_breakeven_matches_the_design_brief() -> None:
    # DESIGN.md: at $38/PH/day an S21 (17.5 J/TH) breaks even near $0.09/kWh.
    assert load_catalogue().get("s21").breakeven_usd_per_mwh(38.0) == pytest.approx(90.5, abs=1)


@pytest.mark.parametrize("key", REQUIRED)
def test_underclocking_improves_efficiency(key: str) -> None:
    m = load_catalogue().get(key)
    targets = m.targets_w()
    j_per_th = targets / m.hashrate_ths(targets)
    assert targets[0] == m.min_w and targets[-1] <= m.max_w
    assert np.all(np.diff(j_per_th) > 0), "every step up costs more J/TH"
    assert m.hashrate_ths(m.nominal_w) == pytest.approx(m.nominal_ths, rel=0.01)


def test_a_convex_curve_is_refused() -> None:
    base = load_catalogue().get("s21").model_dump()
    base["curve"] = [(1800, 100.0), (2800, 120.0), (3800, 210.0)]
    with pytest.raises(ValidationError, match="concave"):
        MinerModel.model_validate(base)


def test_presets_and_padding() -> None:
    cat = load_catalogue()
    preset = cat.get("s21").model_copy(update={"presets_w": (2000.0, 3500.0)})
    power, hashrate = operating_points([cat.get("s21"), preset])
    assert power.shape == hashrate.shape
    assert power[1, :3].tolist() == [preset.sleep_w, 2000.0, 3500.0]
    assert np.all(power[1, 3:] == 3500.0), "short rows repeat their last point"
    assert hashrate[0, 0] == 0.0 and hashrate[1, 0] == 0.0


def test_every_view_shows_the_one_break_even_and_names_it(tmp_path: Path) -> None:
    """The reviewer saw $59 (demo, top), $56.5 at a default $40 (`models`), $49 (chart) and
    48.54 (backtest) for one S19j Pro. Now one function, one name, the site's hashprice."""
    import asyncio  # noqa: PLC0415
    import contextlib  # noqa: PLC0415
    import io  # noqa: PLC0415

    from controller.backtest import Settings, run_backtest  # noqa: PLC0415
    from controller.backtest.report import text_report  # noqa: PLC0415
    from controller.cli.main import main  # noqa: PLC0415
    from controller.daemon.loop import Controller  # noqa: PLC0415
    from controller.view import SiteClock, SiteView  # noqa: PLC0415
    from tests.conftest import make_site  # noqa: PLC0415
    from tests.test_grid import toml_of  # noqa: PLC0415

    class _NoBroker:
        host, port = "127.0.0.1", 1

    cfg = make_site(_NoBroker(), [("a", "s19j_pro", 20), ("b", "s21", 20)],  # type: ignore[arg-type]
                    power_cap_kw=150, energy={"adders_usd_per_mwh": 8.0, "aux_fraction": 0.05},
                    grid={"journal_path": str(tmp_path / "grid.db")})
    s19 = load_catalogue().get("s19j_pro")
    all_in = s19.breakeven_usd_per_mwh(42.0, aux_fraction=0.05)
    assert all_in == pytest.approx(104 * 42 / 1e3 / 24 / (3068 * 1.05 / 1e6))
    assert round(all_in, 1) == 56.5
    name = breakeven_label(42.0, 0.05)
    assert name == ("break-even all-in price (market + adders) at stock incl. 5 % aux, at "
                    "$42.00/PH/day")

    # `mineops models --config`: the site's hashprice, not a default.
    site = tmp_path / "site.toml"
    site.write_text(toml_of(cfg.model_dump(mode="json", exclude_none=True)))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["models", "--config", str(site)]) == 0
    text = out.getvalue()
    assert text.splitlines()[0] == f"{name}:"
    assert next(line for line in text.splitlines() if line.startswith("s19j_pro")).endswith(
        " 56.5")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["models"]) == 0
    assert "break-even" not in out.getvalue().splitlines()[0], "no hashprice: no figure"

    # The live view (demo, top) and the metrics of a controller of that site.
    c = Controller(cfg)
    snap = asyncio.run(c.decide_and_act("tick"))
    view = SiteView("test", snap.summary(), SiteClock.wall(UTC), snap.at_unix_s,
                    models={"s19j_pro": s19}, aux_fraction=cfg.energy.aux_fraction)
    assert view.breakevens() == f"{name}: s19j_pro $56/MWh"
    metric = next(line for line in c.metrics.render().decode().splitlines()
                  if line.startswith('mineops_breakeven_price_usd_per_mwh{model="s19j_pro"}'))
    assert float(metric.rsplit(" ", 1)[1]) == pytest.approx(all_in)

    # The backtest: the same all-in figure, and its on/off strike is it less the adders.
    start = np.arange(8, dtype=np.float64) * 900.0 + 1.7e9
    r = run_backtest(cfg, start, np.full(8, 30.0), 900.0, Settings.from_config(cfg))
    s = r.summary()
    assert s["breakeven_usd_per_mwh"]["s19j_pro"] == pytest.approx(all_in, abs=0.005)
    assert s["strike_usd_per_mwh"]["s19j_pro"] == pytest.approx(all_in - 8.0, abs=0.005)
    report = text_report(r)
    assert f"{name}; on/off strike: that less the $8.00/MWh adders" in report
