"""The simulated site that the demo, the tests and the benchmarks drive.

A fleet of miners speaking the project's topics (`fleet.py`, `site.py`), price replays
(`prices.py`), a LuxOS API per simulated miner for the bridge (`luxos_api.py`), an energy
campus with SunSpec devices on Modbus TCP (`campus.py`, `campus_modbus.py`,
`campus_site.py`) and faults to inject (`faults.py`).
"""
