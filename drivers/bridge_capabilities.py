"""What the bridge tells the controller about each miner's power control (retained, per group).

    mineops/<site>/group/<g>/capabilities   bridge -> controller   retained, QoS 1

A preset-only firmware (LuxOS profiles, VNish) runs only at its presets, so those are
the miner's operating points; a continuous one (Braiins OS) takes any target in the
catalogue's range; `none` (stock firmware) only runs at stock or sleeps. Miners with the
same presets share one entry, so a rack of identical machines costs a few hundred bytes.

The payload and topic leaf live here until the controller consumes them; they belong in
controller/payloads.py and controller/topics.py (Kind.GROUP_CAPABILITIES) then.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from controller.payloads import Payload

CAPABILITIES_LEAF = "capabilities"


class PowerControlSet(BaseModel):
    """Miners that share one way of setting power."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    firmware: str = Field(max_length=32, description="pyasic's firmware name, e.g. 'LuxOS'")
    control: Literal["presets", "range", "none"]
    presets_w: list[float] | None = Field(
        default=None, max_length=128, description="Ascending preset powers, W (presets only)")
    presets_ths: list[float] | None = Field(
        default=None, max_length=128,
        description="The firmware's own hashrate for each preset, TH/s, when it reports one")
    miners: list[str] = Field(min_length=1, max_length=5000)

    @model_validator(mode="after")
    def _check(self) -> PowerControlSet:
        if (self.control == "presets") != bool(self.presets_w):
            raise ValueError("presets_w is given exactly when control is 'presets'")
        if self.presets_w and self.presets_w != sorted(self.presets_w):
            raise ValueError("presets_w must be ascending")
        if self.presets_ths is not None and len(self.presets_ths) != len(self.presets_w or []):
            raise ValueError("presets_ths must match presets_w")
        return self


class GroupCapabilities(Payload):
    """mineops/<site>/group/<g>/capabilities (retained): the group's power controls."""

    MAX_BYTES: ClassVar[int] = 512 * 1024

    ts: float = Field(ge=0)
    sets: list[PowerControlSet] = Field(max_length=5000)
