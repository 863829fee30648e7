"""mineops: an operations controller for Bitcoin mining sites.

One package per pipeline stage (docs/architecture.md): `protocol/` (MQTT topics,
payloads, transport), `core/` (fleet state, optimizer, policy, actuation, price in force),
`grid/` (grid obligations and their journal), `daemon/` (the decision loop, ingest,
snapshot, metrics), `backtest/`, `view/` and `cli/` (the `mineops` command), with the
site file (`config.py`, `campus_config.py`, `site_file.py`) and the miner-model
catalogue (`catalogue.py`) beside them.
"""
