"""check-config catches the mistakes people make: units, inverted pairs, nan, typos, paths.

Each test runs the command line (`controller.cli.main`) on a copy of the example site
file with one mistake in it, and checks the exit code and that the message names the
field, the value and, for the cap, the likely unit.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from controller.cli import main
from controller.config import SiteConfig
from controller.site_file import NOT_CONFIG_VARIABLES, environment_names, load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "deploy" / "site.example.toml"
EXAMPLE_JOURNAL = 'journal_path = "/var/lib/mineops/grid.sqlite3"'


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No MINEOPS_* overrides from the shell running the tests (the allow-listed stay)."""
    for name in list(os.environ):
        if name.upper().startswith("MINEOPS_") and name.upper() not in NOT_CONFIG_VARIABLES:
            monkeypatch.delenv(name)
    yield


def site(tmp_path: Path, *edits: tuple[str, str]) -> Path:
    """The example site file with `edits` (old, new) applied and its journal in tmp_path."""
    text = EXAMPLE.read_text()
    assert EXAMPLE_JOURNAL in text
    text = text.replace(EXAMPLE_JOURNAL, f'journal_path = "{tmp_path / "grid.sqlite3"}"')
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["check-config", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


# -- the power cap against the fleet ------------------------------------------------------


def test_ok_line_compares_the_cap_with_the_fleet(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = check(site(tmp_path), capsys)
    assert code == 0, err
    assert "ok: site 'pecos-1', 1000 miners in 26 groups" in out
    assert "cap 3600 kW (fleet stock draw 3860 kW incl. 5 % aux)" in out
    assert "warning" not in out


def test_cap_in_watts_is_rejected_with_a_unit_hint(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    f = site(tmp_path, ("power_cap_kw = 3600", "power_cap_kw = 3600000"))
    code, _, err = check(f, capsys)
    assert code == 2
    assert "power_cap_kw: 3600000 kW is 933 times the fleet's stock draw (3860 kW" in err
    assert "looks like W typed as kW (3600000 W = 3600 kW)" in err
    assert len(err.splitlines()) == 1


def test_cap_in_megawatts_is_rejected_with_a_unit_hint(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    f = site(tmp_path, ("power_cap_kw = 3600", "power_cap_kw = 3.6"))
    code, _, err = check(f, capsys)
    assert code == 2
    assert "power_cap_kw: 3.6 kW is 1/1072 of the fleet's stock draw" in err
    assert "looks like MW typed as kW (3.6 MW = 3600 kW)" in err
    # The example's never-curtail rack could not run either; that is said too.
    assert "below the never-curtail miners' maximum draw of 227 kW" in err


def test_cap_below_the_never_curtail_load_is_rejected(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    f = site(tmp_path, ("power_cap_kw = 3600", "power_cap_kw = 200"))
    code, _, err = check(f, capsys)
    assert code == 2
    assert ("power_cap_kw: 200 kW (198 kW after the 1 % headroom) is below the never-curtail "
            "miners' maximum draw of 227 kW incl. 5 % aux (groups s23-hydro-r1)") in err
    assert "typed as" not in err, "200 kW is a plausible cap, just too low"
    # However the config is built, not only from a file: the model refuses it.
    with pytest.raises(ValidationError, match="never-curtail"):
        SiteConfig.model_validate({
            "site_id": "s", "power_cap_kw": 10, "hashprice_usd_per_ph_day": 40,
            "fleet": {"groups": [{"name": "a", "model": "s21", "count": 4,
                                  "never_curtail": True}]},
        })


def test_cap_far_above_the_fleet_is_a_warning(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    f = site(tmp_path, ("power_cap_kw = 3600", "power_cap_kw = 12000"))
    code, out, err = check(f, capsys)
    assert code == 0, err
    assert ("warning: power_cap_kw: 12000 kW is 3.1 times the fleet's stock draw (3860 kW "
            "incl. 5 % aux): the cap never binds") in out


def test_cap_below_the_smallest_miner_is_a_warning(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "one.toml"
    f.write_text('site_id = "one"\npower_cap_kw = 2\nhashprice_usd_per_ph_day = 40\n'
                 f'[grid]\njournal_path = "{tmp_path / "grid.db"}"\n'
                 '[[fleet.groups]]\nname = "a"\nmodel = "s19j_pro"\ncount = 1\n')
    code, out, err = check(f, capsys)
    assert code == 0, err
    assert ("warning: power_cap_kw: 2 kW is below the smallest miner's stock draw (3.22 kW "
            "incl. aux, Antminer S19j Pro): no miner can run at stock") in out


def test_environment_override_of_the_cap_is_checked(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINEOPS_POWER_CAP_KW", "3600000")
    code, _, err = check(site(tmp_path), capsys)
    assert code == 2 and "looks like W typed as kW" in err


# -- inverted and non-finite values -------------------------------------------------------


@pytest.mark.parametrize("restore_hz", ["59.5", "59.7"])
def test_frequency_restore_at_or_below_shed_is_rejected(tmp_path: Path, restore_hz: str,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    f = site(tmp_path, ("restore_above_hz = 59.9", f"restore_above_hz = {restore_hz}"))
    code, _, err = check(f, capsys)
    assert code == 2
    assert ("grid.frequency.restore_above_hz: must be above shed_below_hz (59.7 Hz)" in err
            and f"(got {restore_hz})" in err)


@pytest.mark.parametrize("critical", ["80", "70"])
def test_critical_temperature_at_or_below_derate_start_is_rejected(
        tmp_path: Path, critical: str, capsys: pytest.CaptureFixture[str]) -> None:
    f = site(tmp_path, ("critical_c = 95 ", f"critical_c = {critical} "))
    code, _, err = check(f, capsys)
    assert code == 2
    assert "policy.critical_c: must be above derate_start_c (80 C)" in err
    assert f"(got {critical})" in err


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ("telemetry_stale_s = 30 ", "telemetry_stale_s = inf ", "policy.telemetry_stale_s"),
        ("critical_c = 95 ", "critical_c = nan ", "policy.critical_c"),
        ("default_price_usd_per_mwh = 1000.0", "default_price_usd_per_mwh = nan",
         "energy.default_price_usd_per_mwh"),
        ("power_cap_kw = 3600", "power_cap_kw = inf", "power_cap_kw"),
        ("aux_fraction = 0.05", "aux_fraction = nan", "energy.aux_fraction"),
        ("restore_hold_s = 30", "restore_hold_s = inf", "grid.frequency.restore_hold_s"),
        ("min_run_s = 300", "min_run_s = inf", "policy.min_run_s"),
        ("hysteresis_usd_per_mwh = 5", "hysteresis_usd_per_mwh = inf",
         "policy.hysteresis_usd_per_mwh"),
    ],
)
def test_non_finite_values_are_rejected(tmp_path: Path, old: str, new: str, where: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = check(site(tmp_path, (old, new)), capsys)
    assert code == 2
    assert re.search(rf"{re.escape(where)}: Input should be a finite number \(got (nan|inf)\)",
                     err), err


def test_ramp_limit_alone_may_be_infinite(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    ramp = "# ramp_kw_per_min = 2000"
    assert check(site(tmp_path, (ramp, "ramp_kw_per_min = inf")), capsys)[0] == 0
    assert load_config(site(tmp_path)).policy.ramp_kw_per_min == float("inf")  # the default
    code, _, err = check(site(tmp_path, (ramp, "ramp_kw_per_min = nan")), capsys)
    assert code == 2 and "policy.ramp_kw_per_min" in err and "(got nan)" in err


# -- every error at once, unknown keys and variables --------------------------------------


def test_every_error_is_reported_in_one_run(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    f = site(tmp_path, ("power_cap_kw = 3600", "power_cap_kwh = 3600"),
             ("critical_c = 95 ", "critical_c = nan "),
             ("restore_above_hz = 59.9", "restore_above_hz = 59.5"))
    code, _, err = check(f, capsys)
    assert code == 2
    lines = err.splitlines()
    assert all(line.startswith(f"mineops: {f}: ") for line in lines)
    assert len(lines) == 4, err
    assert "power_cap_kw: Field required" in err
    assert "power_cap_kwh: unknown key; did you mean power_cap_kw? (got 3600)" in err
    assert "policy.critical_c: Input should be a finite number (got nan)" in err
    assert "grid.frequency.restore_above_hz: must be above shed_below_hz" in err


W_CAP = ("power_cap_kw: 3600000 kW is 933 times the fleet's stock draw (3860 kW incl. 5 % "
         "aux): looks like W typed as kW (3600000 W = 3600 kW)")
MW_CAP = ("power_cap_kw: 3.6 kW is 1/1072 of the fleet's stock draw (3860 kW incl. 5 % aux): "
          "looks like MW typed as kW (3.6 MW = 3600 kW)")


@pytest.mark.parametrize(("edits", "expected"), [
    # The reviewer's four: the cap's unit was missing whenever another field failed.
    ([("power_cap_kw = 3600", "power_cap_kw = 3600000"), ("[broker]", "[broker]\nfoo = 1")],
     ["broker.foo: unknown key", W_CAP]),
    ([("power_cap_kw = 3600", "power_cap_kw = 3600000"),
      ("restore_above_hz = 59.9", "restore_above_hz = 59.6")],
     ["grid.frequency.restore_above_hz: must be above shed_below_hz", W_CAP]),
    ([("power_cap_kw = 3600", "power_cap_kw = 3.6"), ("aux_fraction = 0.05 ", "aux_fraction = 5 "),
      ("restore_above_hz = 59.9", "restore_above_hz = 59.5")],
     ["energy.aux_fraction: Input should be less than or equal to 1 (got 5)",
      "grid.frequency.restore_above_hz: must be above shed_below_hz", MW_CAP]),
    ([("power_cap_kw = 3600", "power_cap_kw = 3600000"),
      ('model = "s19j_pro"', 'model = "s19j_prox"')],
     ["fleet.groups.0.model: unknown miner model 's19j_prox'",
      "power_cap_kw: 3600000 kW is 907 times the fleet's largest possible stock draw (3969 kW "
      "incl. 5 % aux, its 40 miners of unknown models counted at the catalogue's largest): "
      "looks like W typed as kW (3600000 W = 3600 kW)"]),
    ([("power_cap_kw = 3600", "power_cap_kw = 3.6"), ('model = "s19j_pro"', 'model = "s9"')],
     ["fleet.groups.0.model: unknown miner model 's9'",
      "power_cap_kw: 3.6 kW is 1/1036 of the stock draw of its miners of known models (3731 kW "
      "incl. 5 % aux): looks like MW typed as kW (3.6 MW = 3600 kW)"]),
    # Nothing to judge: the cap itself is the error, or the fleet's size is unknown.
    ([("power_cap_kw = 3600", "power_cap_kw = -3600"), ("[broker]", "[broker]\nfoo = 1")],
     ["broker.foo: unknown key", "power_cap_kw: Input should be greater than 0"]),
    ([("power_cap_kw = 3600", "power_cap_kw = 3600000"), ("count = 40", "count = -40")],
     ["fleet.groups.0.count: Input should be greater than or equal to 1"]),
])
def test_the_cap_unit_is_checked_beside_other_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], edits: list[tuple[str, str]],
        expected: list[str]) -> None:
    code, out, err = check(site(tmp_path, *edits), capsys)
    assert code == 2 and out == ""
    lines = [line.split(": ", 2)[2] for line in err.splitlines()]
    assert len(lines) == len(expected), err
    for line, want in zip(lines, expected, strict=True):
        assert line.startswith(want), (line, want)


def test_unknown_models_never_make_a_unit_claim_that_could_be_wrong(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Left out, 990 miners of an unknown model would make 3600 kW look 100x ten S19j Pros."""
    f = tmp_path / "site.toml"
    f.write_text('site_id = "s"\npower_cap_kw = 3600\nhashprice_usd_per_ph_day = 40\n'
                 '[broker]\nfoo = 1\n[grid]\njournal_path = "' + str(tmp_path / "g.db") + '"\n'
                 '[[fleet.groups]]\nname = "new"\nmodel = "s99"\ncount = 990\n'
                 '[[fleet.groups]]\nname = "old"\nmodel = "s19j_pro"\ncount = 10\n')
    code, _, err = check(f, capsys)
    assert code == 2 and "power_cap_kw" not in err, err
    assert len(err.splitlines()) == 2, err


def test_the_cap_from_the_environment_is_checked_beside_other_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINEOPS_POWER_CAP_KW", "3.6")
    code, _, err = check(site(tmp_path, ("[broker]", "[broker]\nfoo = 1")), capsys)
    assert code == 2
    assert [line.split(": ", 2)[2][:16] for line in err.splitlines()] == [
        "broker.foo: unkn", "power_cap_kw: 3."]
    assert MW_CAP in err


def test_unknown_key_in_a_table_suggests_the_closest(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    f = site(tmp_path, ('host = "127.0.0.1"', 'hots = "127.0.0.1"'),
             ("name = \"s21-r1\"", "name = \"s21-r1\"\ncuont = 3"),
             ("per_miner = false", "per_miner = false\nzzz = 1"))
    code, _, err = check(f, capsys)
    assert code == 2
    assert "broker.hots: unknown key; did you mean host? (got '127.0.0.1')" in err
    assert "fleet.groups.7.cuont: unknown key; did you mean count? (got 3)" in err
    assert "metrics.zzz: unknown key (see deploy/site.example.toml for the keys)" in err


def test_unknown_environment_variable_is_an_error(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINEOPS_POWER_CAP_KWH", "3000")
    monkeypatch.setenv("MINEOPS_BROKER__PASWORD", "s3cret")
    code, _, err = check(site(tmp_path), capsys)
    assert code == 2
    assert ("environment variable MINEOPS_POWER_CAP_KWH: unknown; did you mean "
            "MINEOPS_POWER_CAP_KW?") in err
    # A nested one reaches pydantic as an unknown key too: said once, by its variable.
    assert ("environment variable MINEOPS_BROKER__PASWORD: unknown; did you mean "
            "MINEOPS_BROKER__PASSWORD?") in err
    assert len(err.splitlines()) == 2, err
    assert "s3cret" not in err, "a value may be a secret"


def test_project_variables_are_not_config_errors(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for name in NOT_CONFIG_VARIABLES:
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("MINEOPS_GRID__FREQUENCY__RESTORE_HOLD_S", "10")
    code, _, err = check(site(tmp_path), capsys)
    assert code == 0, err


def test_every_mineops_variable_in_the_repository_is_known() -> None:
    """The allow-list stays complete: a MINEOPS_ variable in code is a key or is listed.

    Markdown is left out: the docs show typos on purpose.
    """
    known = environment_names() | NOT_CONFIG_VARIABLES
    here = Path(__file__).resolve()
    found: dict[str, Path] = {}
    for top in ("controller", "drivers", "simulators", "tests", "deploy", "benchmarks", ".ci"):
        for path in (ROOT / top).rglob("*"):
            if (path == here or not path.is_file() or path.suffix == ".md"
                    or "__pycache__" in path.parts):
                continue
            for name in re.findall(r"\bMINEOPS_[A-Z0-9_]*[A-Z0-9]", path.read_text("utf-8",
                                                                                    "ignore")):
                found.setdefault(name, path)
    unknown = {n: str(p.relative_to(ROOT)) for n, p in found.items() if n not in known}
    assert not unknown, f"add to NOT_CONFIG_VARIABLES or fix: {unknown}"
    assert "MINEOPS_BROKER__PASSWORD" in found  # the scan does see the documented ones


# -- paths and ports ------------------------------------------------------------------------


def test_unusable_journal_path_fails_check_config_and_run(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the journal's directory should be\n")
    journal = blocker / "grid.sqlite3"  # fails for root too, unlike a read-only directory
    f = site(tmp_path)
    f.write_text(f.read_text().replace(str(tmp_path / "grid.sqlite3"), str(journal)))
    expected = (f"grid.journal_path: {journal} cannot be created: {blocker} is not a "
                "directory")
    code, _, err = check(f, capsys)
    assert code == 2 and expected in err and len(err.splitlines()) == 1
    assert main(["run", "--config", str(f)]) == 2
    assert expected in capsys.readouterr().err
    # A directory where the file should be.
    f.write_text(f.read_text().replace(str(journal), str(tmp_path)))
    code, _, err = check(f, capsys)
    assert code == 2 and f"grid.journal_path: {tmp_path} is a directory" in err


def test_metrics_port_in_use_names_host_and_port(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    f = site(tmp_path, ('host = "0.0.0.0"', 'host = "127.0.0.1"'))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["run", "--config", str(f), "--metrics-port", str(port)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == (f"mineops: metrics endpoint 127.0.0.1:{port}: address already in "
                           "use (set [metrics] port or --metrics-port)")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"mineops {importlib.metadata.version('mineops')}"


def test_run_logs_cap_warnings_at_start(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    f = site(tmp_path, ("power_cap_kw = 3600", "power_cap_kw = 12000"),
             ('host = "0.0.0.0"', 'host = "127.0.0.1"'))
    with socket.socket() as taken:  # stops `run` right after start-up's checks
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code = main(["--log-format", "json", "run", "--config", str(f), "--metrics-port",
                     str(taken.getsockname()[1])])
    err = capsys.readouterr().err
    assert code == 2
    assert '"event": "config_warning"' in err and "12000 kW is 3.1 times" in err


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/proc/self").is_dir(),
                    reason="needs root on Linux: /proc refuses new files even to root")
@pytest.mark.parametrize(("journal", "why"), [
    ("/proc/grid.sqlite3", "/proc/grid.sqlite3: cannot be created here: unable to open "
                           "database file"),
    ("/proc/mineops/grid.sqlite3", "/proc/mineops/grid.sqlite3: cannot be created: no such "
                                   "file or directory (/proc/mineops)"),
    ("/sys/grid.sqlite3", "/sys/grid.sqlite3: cannot be created here: unable to open database "
                          "file"),
])
def test_a_journal_root_cannot_create_fails_check_config_as_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], journal: str, why: str) -> None:
    """The reviewer's: /proc passes every permission check for root, yet SQLite cannot
    create a file there: check-config said ok and `run` stopped at start."""
    f = site(tmp_path)
    f.write_text(f.read_text().replace(str(tmp_path / "grid.sqlite3"), journal))
    code, out, err = check(f, capsys)
    assert code == 2 and out == ""
    assert err == f"mineops: {f}: grid.journal_path: {why}\n"
    assert main(["run", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert err == f"mineops: {f}: grid.journal_path: {why}\n" and "Traceback" not in err


def test_a_new_journal_is_tried_where_run_creates_it_and_nothing_is_left(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    journal = tmp_path / "state" / "mineops" / "grid.sqlite3"
    f = site(tmp_path)
    f.write_text(f.read_text().replace(str(tmp_path / "grid.sqlite3"), str(journal)))
    stale_wal = tmp_path / "grid.sqlite3-wal"  # not the checked journal's: left alone
    stale_wal.write_text("x")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, out, _ = check(f, capsys)
    assert code == 0 and ": ok: " in out
    assert sorted(p.name for p in tmp_path.rglob("*")) == before, "check-config left files"


def test_a_file_that_is_not_a_journal_fails_check_config_as_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n" * 100)
    f = site(tmp_path)
    f.write_text(f.read_text().replace(str(tmp_path / "grid.sqlite3"), str(notes)))
    why = (f"grid.journal_path: {notes}: file is not a database (not an SQLite journal: "
           "point grid.journal_path at a new file)")
    code, _, err = check(f, capsys)
    assert code == 2 and err == f"mineops: {f}: {why}\n"
    assert main(["run", "--config", str(f)]) == 2
    assert capsys.readouterr().err == f"mineops: {f}: {why}\n"
    assert notes.read_text() == "not a database\n" * 100


def test_a_variable_that_is_not_json_is_one_line(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINEOPS_FLEET", "{groups: oops")
    f = site(tmp_path)
    code, _, err = check(f, capsys)
    assert code == 2
    assert err == (f"mineops: {f}: environment variable MINEOPS_FLEET: not valid JSON (a table "
                   "or a list is set whole, as JSON)\n")


# -- the journal's path beside every other problem ------------------------------------------


REVIEWER_FILE = """site_id = "pecos-1"
power_cap_kw = 3600000
hashprice_usd_per_ph_day = 42.0
[broker]
host = "127.0.0.1"
[fleet]
groups = [{name = "a", model = "s21", count = 1000}, {name = "b", model = "s99", count = 10}]
[grid]
journal_path = "/proc/nope/grid.sqlite3"
journal_pth = "x"
[grid.frequency]
shed_below_hz = 59.7
restore_above_hz = 59.5
"""


def test_journal_problem_is_listed_with_the_other_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The reviewer's file: a cap in W, a misspelt key, an unknown model, inverted Hz and a
    journal no one can create; the journal's line was missing."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the journal's directory should be\n")
    journal = blocker / "grid.sqlite3"  # /proc/nope for root and others alike
    f = tmp_path / "site.toml"
    f.write_text(REVIEWER_FILE.replace("/proc/nope/grid.sqlite3", str(journal)))
    code, out, err = check(f, capsys)
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 5, err
    for part in ("fleet.groups.1.model: unknown miner model 's99'",
                 "grid.frequency.restore_above_hz: must be above shed_below_hz",
                 "grid.journal_pth: unknown key; did you mean journal_path?",
                 "power_cap_kw: 3600000 kW is ",
                 f"grid.journal_path: {journal} cannot be created: {blocker} is not a "
                 "directory"):
        assert sum(part in line for line in lines) == 1, part
    # `run` lists the same, and starts nothing.
    assert main(["run", "--config", str(f)]) == 2
    assert capsys.readouterr().err.splitlines() == lines


def test_journal_path_from_the_environment_is_checked_with_other_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "blocker").write_text("x")
    journal = tmp_path / "blocker" / "grid.sqlite3"
    monkeypatch.setenv("MINEOPS_GRID__JOURNAL_PATH", str(journal))
    f = site(tmp_path, ("power_cap_kw = 3600", "power_cap_kw = -1"))
    code, _, err = check(f, capsys)
    assert code == 2
    assert f"grid.journal_path: {journal} cannot be created: " in err
    assert "power_cap_kw: " in err and len(err.splitlines()) == 2


def test_a_good_journal_adds_no_line_to_other_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = site(tmp_path, ("power_cap_kw = 3600", "power_cap_kw = -1"))
    code, _, err = check(f, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "power_cap_kw: " in err
    assert not (tmp_path / "grid.sqlite3").exists()


def test_the_default_journal_path_is_checked_with_other_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No journal_path: the default, relative to the current directory, is what run opens."""
    cwd = tmp_path / "cwd"
    (cwd / "mineops-grid.sqlite3").mkdir(parents=True)  # the default path is a directory
    monkeypatch.chdir(cwd)
    f = site(tmp_path, ("power_cap_kw = 3600", "power_cap_kw = -1"))
    f.write_text("\n".join(line for line in f.read_text().splitlines()
                           if not line.startswith("journal_path")))
    code, _, err = check(f, capsys)
    assert code == 2
    assert ("grid.journal_path: mineops-grid.sqlite3 is a directory, not a file (the "
            f"relative path 'mineops-grid.sqlite3' means {cwd / 'mineops-grid.sqlite3'} in "
            "this directory; under systemd the directory is /)") in err


def test_a_relative_journal_path_is_a_warning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    f = site(tmp_path)
    f.write_text(f.read_text().replace(str(tmp_path / "grid.sqlite3"), "state/grid.sqlite3"))
    code, out, _ = check(f, capsys)
    assert code == 0
    warnings = [line for line in out.splitlines() if ": warning: " in line]
    assert warnings == [f"{f}: warning: grid.journal_path: 'state/grid.sqlite3' is relative: "
                        f"it means {tmp_path / 'state' / 'grid.sqlite3'} from this directory, "
                        "another file from another (/ under systemd); set an absolute path, "
                        "e.g. /var/lib/mineops/grid.sqlite3"]
    # An absolute path: no warning.
    f.write_text(f.read_text().replace("state/grid.sqlite3", str(tmp_path / "g.sqlite3")))
    code, out, _ = check(f, capsys)
    assert code == 0 and ": warning: " not in out
