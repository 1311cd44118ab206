"""Owns the upstream vendor connection and publishes numbered ticks to the bus."""
