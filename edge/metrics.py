"""Prometheus metrics of the edge. Counted per message or event, never per delivery.

Gauges name how a multi-core edge's workers add up (prometheus-client multiprocess mode,
see edge/workgroup.py); a single process ignores it.
"""

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Gauge("fxproxy_edge_connections", "Open client WebSocket connections",
                    multiprocess_mode="livesum")
HANDSHAKES_REJECTED = Counter(
    "fxproxy_edge_handshakes_rejected", "Handshakes refused, by reason", ["reason"]
)
HANDSHAKES_PENDING = Gauge("fxproxy_edge_handshakes_pending", "TCP connections not yet upgraded",
                           multiprocess_mode="livesum")
MESSAGES = Counter("fxproxy_edge_bus_messages", "Tick messages received from the bus")
DELIVERIES = Counter("fxproxy_edge_deliveries", "Tick frames queued to clients")
DUPLICATES = Counter("fxproxy_edge_duplicate_ticks", "Ticks dropped as already forwarded (seq)")
GAPS = Counter("fxproxy_edge_seq_gaps", "Times a symbol's seq jumped by more than one on the bus")
GAPS_REPAIRED = Counter("fxproxy_edge_gaps_repaired", "Bus gaps filled from history before delivery")
GAPS_UNRECOVERABLE = Counter(
    "fxproxy_edge_gaps_unrecoverable", "Bus gaps history could not fill: announced with reset"
)
EPOCH_CHANGES = Counter("fxproxy_edge_epoch_changes", "Symbol streams that restarted under a new epoch")
THROTTLED = Counter(
    "fxproxy_edge_throttled_ticks", "Ticks replaced by a newer one within a max_rate bucket (once per bucket)"
)
CONFLATED = Counter("fxproxy_edge_conflated_ticks", "Ticks replaced by a newer one for a slow client")
LAGGING = Counter("fxproxy_edge_lagging", "Times a client fell more than FXPROXY_MAX_LAG behind")
CLIENT_LAG = Histogram(
    "fxproxy_edge_client_lag_seconds", "How far behind clients read: lag probe round trips",
    buckets=(0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0),
)
CLOSED = Counter("fxproxy_edge_closed", "Connections closed, by close code sent (1006: none)", ["code"])
ERRORS = Counter("fxproxy_edge_client_errors", "Error frames sent, by code", ["code"])
# Workers: 1 only while every live worker's subscriber is up; symbols summed, as each worker
# holds its own subscriptions (the load on Redis).
BUS_UP = Gauge("fxproxy_edge_bus_connected", "1 while the bus subscriber is connected and Redis answers",
               multiprocess_mode="livemin")
SUBSCRIBED_SYMBOLS = Gauge("fxproxy_edge_bus_symbols", "Symbols this edge is subscribed to",
                           multiprocess_mode="livesum")
# A cluster shard away (its primary lost and not replaced yet) holds up only its symbols: the
# edge stays ready, and this says how many shards its symbols wait for.
BUS_NODES_AWAY = Gauge("fxproxy_edge_bus_nodes_away",
                       "Redis Cluster nodes whose symbols' subscriptions are lost and not made again yet",
                       multiprocess_mode="livemax")
