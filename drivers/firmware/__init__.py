"""Real miners through their firmware APIs (pyasic): `mineops bridge` speaks MQTT for them."""
