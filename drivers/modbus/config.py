"""A Modbus TCP device speaking SunSpec: where it is, which model to read, how often.

One `[[campus.modbus]]` entry of the site file (controller/campus_config.py) per device
(an inverter, a revenue meter, a battery system, a genset's meter). The campus entry that
names the device by `id` (a firm load, a generator, the battery, the point of
interconnection) gives it its role, and with it the sign of the power it reports
(docs/campus.md, "Sign conventions").
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from controller.config_types import ID_PATTERN, FailedPolls, PollIntervalS, StrictModel

# The SunSpec models this driver decodes (drivers/modbus/sunspec.py): AC meters, inverters
# (the 1xx integer models and the DER AC measurement model of IEEE 1547-2018), storage.
MeterModel = Literal[201, 202, 203, 204]
InverterModel = Literal[101, 102, 103, 701]
StorageModel = Literal[124, 802]
SupportedModel = Literal[101, 102, 103, 124, 201, 202, 203, 204, 701, 802]


class ModbusDeviceConfig(StrictModel):
    """One SunSpec device on Modbus TCP."""

    id: str = Field(pattern=ID_PATTERN,
                    description="Device id: what campus entries name as their `meter`")
    host: str = Field(min_length=1, max_length=253,
                      description="The device's (or its Modbus TCP gateway's) host name or address")
    port: int = Field(default=502, ge=1, le=65535, description="Modbus TCP port (502 standard)")
    unit_id: int = Field(
        default=1, ge=0, le=255,
        description="Modbus unit id (slave address): 1-247 behind a gateway; many TCP devices "
        "answer on 1, some on 0 or 255, some on 126 (SMA)")
    base_address: int | None = Field(
        default=None, ge=0, le=65533,
        description="Register address (0-based) of the 'SunS' marker; unset: found by trying "
        "40000, 40001, 50000 and 0 in turn")
    model: SupportedModel | None = Field(
        default=None,
        description="SunSpec model read for power, frequency and energy (201-204 meter, "
        "101-103 or 701 inverter, 802 battery DC); unset: the first the device has of those "
        "its role reads (docs/campus.md)")
    soc_model: StorageModel | None = Field(
        default=None,
        description="SunSpec model read for a battery's state of charge (802 SoC or 124 "
        "ChaState); unset: 802, else 124, when the device has one; only for a battery")
    invert_power: bool = Field(
        default=False,
        description="The device's power is signed against its model's convention (a current "
        "transformer mounted backwards; meters that count export as positive)")
    poll_interval_s: PollIntervalS = Field(default=1.0,
                                           description="The device is read this often, s")
    timeout_s: float = Field(default=1.0, gt=0, le=60,
                             description="A request taking longer has failed, s")
    unavailable_after_polls: FailedPolls = Field(
        default=3,
        description="Failed polls in a row before the device is reported unavailable (its "
        "role then counts at its worst case)")

    @model_validator(mode="after")
    def _check(self) -> ModbusDeviceConfig:
        if self.timeout_s > self.poll_interval_s * 10:
            raise ValueError(
                f"timeout_s ({self.timeout_s:g} s) is more than 10 times poll_interval_s "
                f"({self.poll_interval_s:g} s): a silent device would hold readings back "
                "that long")
        return self
