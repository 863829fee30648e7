"""The daemon: the decision loop and what feeds and shows it.

The decision loop (`loop.py`, the Controller), message ingest (`ingest.py`), the frozen
decision snapshot (`snapshot.py`), Prometheus metrics (`metrics.py`, `campus_metrics.py`),
the closed loop on the site meter (`closed_loop.py`), the campus's live picture
(`campus.py`) and systemd supervision (`systemd.py`).
"""
