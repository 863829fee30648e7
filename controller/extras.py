"""Optional extras: the parts of mineops that need a large library, installed on demand.

The daemon needs none of them. `pip install 'mineops[bridge]'` adds pyasic for
`mineops bridge`, `[ven]` openleadr for `mineops ven`, `[charts]` matplotlib for
`mineops backtest --out`, `[embedded-broker]` amqtt for a demo or test on a machine
without mosquitto; `[dev]` installs all of them. Where one is used and missing,
`require` raises `MissingExtra`, whose message names the command that installs it.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Extra:
    """One optional extra: its name, the import that proves it installed, what it is for."""

    name: str  # as in pyproject.toml's [project.optional-dependencies]
    module: str  # the import that proves it is installed
    what: str  # what it is for, in the error message


EXTRAS: dict[str, Extra] = {e.name: e for e in (
    Extra("bridge", "pyasic", "the firmware bridge to real miners (pyasic)"),
    Extra("ven", "openleadr", "the OpenADR 2.0b VEN (openleadr)"),
    Extra("charts", "matplotlib", "charts (matplotlib)"),
    Extra("embedded-broker", "amqtt", "the embedded MQTT broker (amqtt)"),
)}


class MissingExtra(ImportError):
    """An optional extra that a command needs is not installed; the message says how to.

    Args:
        extra: The extra's name, a key of EXTRAS (e.g. "bridge").
        feature: What needs it, as the operator knows it (e.g. "mineops bridge").
        detail: Added in parentheses, e.g. the import error of a broken install.
    """

    def __init__(self, extra: str, feature: str, detail: str = "") -> None:
        e = EXTRAS[extra]
        message = (f"{feature} needs {e.what}, which is not installed: "
                   f"pip install 'mineops[{extra}]'")
        if detail:
            message += f" ({detail})"
        super().__init__(message, name=e.module)
        self.extra = extra


def installed(extra: str) -> bool:
    """Whether `extra`'s library can be imported, without importing it."""
    try:
        return importlib.util.find_spec(EXTRAS[extra].module) is not None
    except (ImportError, ValueError):
        return False


def require(extra: str, feature: str) -> None:
    """Import `extra`'s library, or raise MissingExtra naming `feature` and the install.

    Imports it (rather than only looking for it) so that a broken install, e.g. one of its
    own dependencies missing, is reported here too, with the import error as detail.

    Raises:
        MissingExtra: it cannot be imported.
    """
    e = EXTRAS[extra]
    try:
        importlib.import_module(e.module)
    except ImportError as err:
        missing = getattr(err, "name", None)
        detail = "" if missing in (None, e.module) else f"importing {e.module}: {err}"
        raise MissingExtra(extra, feature, detail) from err
