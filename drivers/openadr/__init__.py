"""OpenADR 2.0b: the site's VEN (`mineops ven`) turns a utility's events into grid events."""
