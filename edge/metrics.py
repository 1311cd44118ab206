"""Prometheus metrics of the edge. Counted per message or event, never per delivery."""

from prometheus_client import Counter, Gauge

CONNECTIONS = Gauge("fxproxy_edge_connections", "Open client WebSocket connections")
HANDSHAKES_REJECTED = Counter(
    "fxproxy_edge_handshakes_rejected", "Handshakes refused, by reason", ["reason"]
)
MESSAGES = Counter("fxproxy_edge_bus_messages", "Tick messages received from the bus")
DELIVERIES = Counter("fxproxy_edge_deliveries", "Tick frames queued to clients")
DUPLICATES = Counter("fxproxy_edge_duplicate_ticks", "Ticks dropped as already forwarded (seq)")
GAPS = Counter("fxproxy_edge_seq_gaps", "Times a symbol's seq jumped by more than one on the bus")
CONFLATED = Counter("fxproxy_edge_conflated_ticks", "Ticks replaced by a newer one for a slow client")
CLOSED = Counter("fxproxy_edge_closed", "Connections we closed, by close code", ["code"])
ERRORS = Counter("fxproxy_edge_client_errors", "Error frames sent, by code", ["code"])
BUS_UP = Gauge("fxproxy_edge_bus_connected", "1 while the bus subscriber is connected")
SUBSCRIBED_SYMBOLS = Gauge("fxproxy_edge_bus_symbols", "Symbols this edge is subscribed to")
