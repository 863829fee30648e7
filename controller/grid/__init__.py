"""Grid obligations as a cap over time, and their durable journal.

The lifecycle of demand-response events, peak alerts and frequency sheds
(`obligations.py`), an event's standing against its target (`standing.py`), and the
SQLite journal that keeps them across restarts (`journal.py`).
"""
