"""The MQTT side: every topic and its payload type, versioned payloads, reason codes, the transport
(the only aiomqtt user) and a local broker for the demo and tests.
"""
