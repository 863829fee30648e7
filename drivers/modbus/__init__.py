"""Modbus TCP devices speaking SunSpec (meters, inverters, batteries) for the campus roles.

`config.py` is a device's `[[campus.modbus]]` entry, `sunspec.py` the SunSpec map (model
discovery, decoding, and encoding for the simulator), `poller.py` the pymodbus poller that
turns a device into readings in its campus role's terms. See docs/campus.md.
"""

from drivers.modbus.config import ModbusDeviceConfig
from drivers.modbus.poller import CAMPUS_ROLES, CampusRole, DeviceReading, SunSpecPoller

__all__ = ["CAMPUS_ROLES", "CampusRole", "DeviceReading", "ModbusDeviceConfig", "SunSpecPoller"]
