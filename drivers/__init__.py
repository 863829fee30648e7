"""Drivers: device and market formats to the controller's messages, each with its config table.

`meters/` (Tasmota, Shelly Gen1/Gen2, the project's own), `prices/` (market price files
and the built-in traces), `firmware/` (real miners through pyasic: `mineops bridge`),
`openadr/` (the OpenADR 2.0b VEN: `mineops ven`) and `modbus/` (SunSpec devices of an
energy campus). Each library stays in its own driver (docs/architecture.md).
"""
