"""Reading a site file: TOML and MINEOPS_* variables into a `SiteConfig`, every problem at once.

`load_config` is the door for files people write: on top of the model's own checks it
compares the power cap with the fleet (a cap off by orders of magnitude is a unit typo,
`SiteConfig.cap_review`), checks the environment for unknown variables and, when asked,
the grid journal's path (on the raw value too, when other fields fail). It reports every
problem at once, one line each, naming the field, the value and why.

A relative `grid.journal_path` is resolved against the current directory, as every
command resolves it (`run`, `events`); under systemd that is `/`. `journal_path_warnings`
says so, with the absolute path it means here.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_settings import EnvSettingsSource, SettingsError, TomlConfigSettingsSource

from controller.catalogue import load_catalogue
from controller.config import EnergyConfig, GridConfig, SiteConfig
from controller.config_types import format_kw, unit_slip

# MINEOPS_* variables the project reads that are not site-file keys (the tests and CI set
# them); every other MINEOPS_* variable must name a key of SiteConfig.
NOT_CONFIG_VARIABLES: frozenset[str] = frozenset({
    "MINEOPS_REQUIRE_MOSQUITTO",  # tests/CI: a missing mosquitto fails instead of falling back
    "MINEOPS_REQUIRE_SERVERS",  # tests/CI: missing prometheus/promtool/openssl fail, not skip
    "MINEOPS_TEST_BROKER",  # tests: which broker the integration tests start
})
ENV_PREFIX = "MINEOPS_"


class ConfigError(Exception):
    """A site file that cannot be used: one line per problem, each naming the field and why."""


def load_config(path: Path | str, *, check_journal: bool = False, **overrides: Any
                ) -> SiteConfig:
    """Read and validate a site file (and MINEOPS_* variables); ConfigError lists every problem.

    check_journal: also check that grid.journal_path can be opened for writing (for the
    commands that write it: `run`, and `check-config`, which vouches for `run`).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        data = TomlConfigSettingsSource(SiteConfig, toml_file=path)()
    except ValueError as e:  # tomllib.TOMLDecodeError is a ValueError
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    data.update(overrides)
    env_problems = unknown_environment_variables(os.environ)
    try:
        cfg = SiteConfig(**data)
    except SettingsError as e:  # a MINEOPS_* variable for a table or list that is not JSON
        field = re.search(r'field "([^"]+)"', str(e))
        name = f"{ENV_PREFIX}{field.group(1).upper()}" if field else "a MINEOPS_* variable"
        problems = [*(why for _, why in env_problems),
                    f"environment variable {name}: not valid JSON (a table or a list is set "
                    "whole, as JSON)"]
        if check_journal:
            problems += _raw_journal_problems(_with_environment(data))
        raise ConfigError(_lines(path, problems)) from None
    except ValidationError as e:
        # An unknown nested variable (a misspelt MINEOPS_BROKER__PORT, say) also reaches
        # pydantic as an unknown key; the line naming the variable says more, so keep that.
        from_env = {tuple(name[len(ENV_PREFIX):].lower().split("__"))
                    for name, _ in env_problems}
        problems = [why for _, why in env_problems]
        problems += [validation_problem(err) for err in e.errors()
                     if not (err["type"] == "extra_forbidden" and not _in_file(data, err["loc"])
                             and _env_key(err["loc"]) in from_env)]
        # The cap's unit check runs after the fields' checks pass; with other errors it
        # would wait for the next run, so it is made here on what could be read.
        problems += [p for p in cap_unit_problems(_with_environment(data))
                     if not any(p in known for known in problems)]
        if check_journal:  # it is a file on this machine, whatever else is wrong
            problems += _raw_journal_problems(_with_environment(data))
        raise ConfigError(_lines(path, problems)) from None
    problems = [why for _, why in env_problems] + cfg.cap_review().errors
    if check_journal:
        problems += _journal_problems(cfg.grid.journal_path)
    if problems:
        raise ConfigError(_lines(path, problems))
    return cfg


def _raw_journal_problems(values: Mapping[str, Any]) -> list[str]:
    """The journal path's problems from raw values (file and MINEOPS_* over it).

    The path the model would take: the default when unset; nothing when it is not text
    (the field's own error says so).
    """
    grid = values.get("grid", {})
    raw = grid.get("journal_path", GridConfig.model_fields["journal_path"].default) \
        if isinstance(grid, Mapping) else None
    if not isinstance(raw, str | Path) or not str(raw):
        return []
    return _journal_problems(Path(raw))


def _journal_problems(path: Path) -> list[str]:
    """'grid.journal_path: why' if the journal at `path` cannot be written (or nothing).

    For a relative path the line also names the absolute path it means from here.
    """
    why = journal_path_problem(path)
    if why is None:
        return []
    if not path.is_absolute():
        why += f" (the relative path {str(path)!r} means {path.absolute()} in this " \
               "directory; under systemd the directory is /)"
    return [f"grid.journal_path: {why}"]


def journal_path_warnings(path: Path) -> list[str]:
    """Doubts about a usable journal path: a relative one depends on the directory.

    Under systemd the current directory is `/`, and `mineops events` run from another
    directory would read another file: an absolute path says which file is meant.
    """
    if path.is_absolute():
        return []
    return [f"grid.journal_path: {str(path)!r} is relative: it means {path.absolute()} "
            "from this directory, another file from another (/ under systemd); set an "
            "absolute path, e.g. /var/lib/mineops/grid.sqlite3"]


def _with_environment(data: dict[str, Any]) -> dict[str, Any]:
    """The file's values with the MINEOPS_* variables over them, as SiteConfig reads them."""
    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            return {**base, **{k: merge(base.get(k), v) for k, v in over.items()}}
        return over

    try:
        env = EnvSettingsSource(SiteConfig)()
    except SettingsError:  # a variable that is not JSON: load_config says so
        env = {}
    out: dict[str, Any] = merge(data, env)
    return out


def _number(value: Any) -> float | None:
    """A finite number from a file (int, float) or a variable (text); None otherwise."""
    if isinstance(value, bool):
        return None
    try:
        n = float(value)
    except (TypeError, ValueError):
        return None
    return n if math.isfinite(n) else None


def cap_unit_problems(values: Mapping[str, Any]) -> list[str]:
    """The cap's unit check (`controller.config_types.unit_slip`) on raw, partly invalid values.

    For a site file that fails other checks: the cap against the fleet's stock draw, on
    whatever of `power_cap_kw`, the fleet and `energy.aux_fraction` can be read. A
    missing or invalid cap, or a group without a valid count, gives nothing to judge.
    Miners of unknown models are counted at the catalogue's largest stock draw for
    "W typed as kW" and left out for "MW typed as kW", so neither is claimed unless it
    holds whatever those models are. An invalid aux fraction is taken at its default.
    """
    cap = _number(values.get("power_cap_kw"))
    fleet = values.get("fleet")
    if cap is None or cap <= 0 or not isinstance(fleet, Mapping):
        return []
    catalogue = load_catalogue()
    largest_w = max(m.nominal_w for m in catalogue.models.values())
    known_w = unknown = 0.0
    entries = [*(fleet.get("groups") or []), *(fleet.get("miners") or [])]
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            return []
        is_group = i < len(fleet.get("groups") or [])
        n = _number(entry.get("count")) if is_group else 1.0
        if n is None or n < 1 or n != int(n):
            return []
        model = catalogue.models.get(str(entry.get("model")))
        if model is None:
            unknown += n
        else:
            known_w += model.nominal_w * n
    energy = values.get("energy")
    aux = _number(energy.get("aux_fraction")) if isinstance(energy, Mapping) else None
    if aux is None or not 0 <= aux <= 1:
        aux = EnergyConfig().aux_fraction
    aux1 = 1.0 + aux
    known_kw = known_w * aux1 / 1000.0
    most_kw = (known_w + unknown * largest_w) * aux1 / 1000.0
    incl = f"incl. {aux * 100:.3g} % aux"
    if not unknown:
        slip = unit_slip("power_cap_kw", cap,
                         f"the fleet's stock draw ({format_kw(known_kw)} kW {incl})", known_kw)
        return [] if slip is None else [slip]
    out = []
    above = unit_slip("power_cap_kw", cap,
                      f"the fleet's largest possible stock draw ({format_kw(most_kw)} kW "
                      f"{incl}, its {unknown:.0f} miners of unknown models counted at the "
                      "catalogue's largest)", most_kw)
    if above is not None and cap > most_kw:
        out.append(above)
    below = unit_slip("power_cap_kw", cap,
                      f"the stock draw of its miners of known models ({format_kw(known_kw)} "
                      f"kW {incl})", known_kw)
    if below is not None and cap < known_kw:
        out.append(below)
    return out


def _lines(path: Path, problems: list[str]) -> str:
    """One line per problem, each starting with the file (a problem may hold several)."""
    return "\n".join(f"{path}: {line}" for p in problems for line in p.splitlines())


def describe_validation_error(e: ValidationError) -> str:
    """Every error of `e`, one 'field.path: why (got value)' per line."""
    return "\n".join(validation_problem(err) for err in e.errors())


def validation_problem(err: Any) -> str:
    """One pydantic error as 'field.path: why (got value)'; unknown keys get a suggestion."""
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc)
    msg = re.sub(r"^Value error, ", "", err["msg"])
    if err["type"] == "extra_forbidden":
        msg = "unknown key" + _did_you_mean(str(loc[-1]), _known_keys(loc[:-1]))
    got = err.get("input")
    secret = any(w in str(loc[-1]) for w in ("password", "passphrase")) if loc else False
    if isinstance(got, dict | list) or got is None or secret:
        shown = ""
    else:
        text = repr(got)
        shown = f" (got {text if len(text) <= 80 else text[:77] + '...'})"
    # Checks across fields (e.g. the cap against the fleet) name their field themselves.
    return f"{where}: {msg}{shown}" if where else f"{msg}{shown}"


def _did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]}?"
    return " (see deploy/site.example.toml for the keys)"


def _members(tp: Any) -> list[Any]:
    """The types a field annotation can hold: Annotated, Optional and unions unwrapped."""
    if get_origin(tp) is Annotated:
        return _members(get_args(tp)[0])
    if get_origin(tp) in (Union, types.UnionType):
        return [m for arg in get_args(tp) for m in _members(arg)]
    return [] if tp is type(None) else [tp]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys valid at a pydantic error location (for 'did you mean')."""
    current: list[Any] = [SiteConfig]
    for part in loc:
        following: list[Any] = []
        for tp in (m for t in current for m in _members(t)):
            if isinstance(part, int):
                if get_origin(tp) is list:
                    following.append(get_args(tp)[0])
            elif _is_model(tp):
                if part in tp.model_fields:
                    following.append(tp.model_fields[part].annotation)
                # A union's member appears in the location by its tag or class name.
                elif part == tp.__name__ or part in get_args(_type_tag(tp)):
                    following.append(tp)
        current = following
    return sorted({k for t in current for m in _members(t) if _is_model(m)
                   for k in m.model_fields})


def _type_tag(model: type[BaseModel]) -> Any:
    field_info = model.model_fields.get("type")
    return field_info.annotation if field_info is not None else None


def _env_key(loc: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(p).lower() for p in loc)


def _in_file(data: Any, loc: tuple[Any, ...]) -> bool:
    """Whether the site file's own data holds the key at `loc` (tables only)."""
    for part in loc:
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def environment_names(model: type[BaseModel] | None = None, prefix: str = ENV_PREFIX
                      ) -> set[str]:
    """Every MINEOPS_* variable that sets a key: a field, or a field of a table, with `__`."""
    names: set[str] = set()
    for name, info in (model or SiteConfig).model_fields.items():
        env = f"{prefix}{name}".upper()
        names.add(env)
        for member in _members(info.annotation):
            if _is_model(member):  # a table; lists of tables are set whole, as JSON
                names |= environment_names(member, env + "__")
    return names


def unknown_environment_variables(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """(variable, problem) for each MINEOPS_* variable that names no key and is not ours.

    pydantic-settings would ignore a misspelt top-level one silently, so a typo in an
    override of a password or of the cap would go unnoticed. The value is never shown:
    it may be a secret.
    """
    known = environment_names()
    out = []
    for name in sorted(environ):
        upper = name.upper()  # pydantic-settings matches names case-insensitively
        if not upper.startswith(ENV_PREFIX) or upper in known or upper in NOT_CONFIG_VARIABLES:
            continue
        close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.6)
        hint = (f"; did you mean {close[0]}?" if close else
                " (MINEOPS_<KEY>, with __ between levels, sets a key of the site file)")
        out.append((name, f"environment variable {name}: unknown{hint}"))
    return out


def journal_path_problem(path: Path) -> str | None:
    """Why the grid journal at `path` cannot be opened for writing, or None if it can.

    The daemon creates missing directories, and SQLite in WAL mode writes `-wal` and `-shm`
    files beside the journal, so the directory must be writable as well as the file.
    Nothing is left behind: check-config must not change the machine it checks (a missing
    journal is created as the daemon would create it, then removed with its directories,
    by `controller.grid.journal.journal_problem`).
    """
    try:
        if path.is_dir():
            return f"{path} is a directory, not a file"
        if path.exists():
            if not path.is_file():
                return f"{path} is not a regular file"
            if not os.access(path, os.R_OK | os.W_OK):
                return f"{path} exists but is not readable and writable by uid {os.getuid()}"
        # The first directory up the path that exists: the daemon creates the rest.
        existing = path.absolute().parent
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            return f"{path} cannot be created: {existing} is not a directory"
        if not os.access(existing, os.W_OK | os.X_OK):
            read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
            why = "is on a read-only file system" if read_only else \
                f"is not writable by uid {os.getuid()}"
            return f"{path} cannot be written: {existing} {why}"
    except OSError as e:  # e.g. a parent directory that cannot be searched
        return f"{path} cannot be checked: {e.strerror or e}"
    # What only SQLite can tell: not a database, damaged, or a write lock refused.
    from controller.grid.journal import journal_problem  # noqa: PLC0415

    return journal_problem(path)
