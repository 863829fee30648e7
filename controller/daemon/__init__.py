"""The daemon: the decision loop, message ingest, the decision snapshot, Prometheus metrics and
systemd supervision.
"""
