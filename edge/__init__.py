"""The client-facing WebSocket server: auth, protocol, subscription hub, fan-out."""
