"""The MQTT side of mineops: topics, payloads, reason codes, the transport, a local broker.

Every topic and its payload type (`topics.py`), versioned payloads with size limits
(`payloads.py`), the reason codes of decisions and drops (`reasons.py`), the MQTT
connection (`transport.py`, the only aiomqtt user) and a local broker for the demo and
the tests (`broker.py`).
"""
