"""Prometheus metrics of the ingestor."""

from prometheus_client import Counter, Gauge

QUOTES_RECEIVED = Counter("fxproxy_ingestor_quotes_received", "Quotes received from upstream")
MALFORMED = Counter("fxproxy_ingestor_malformed_messages", "Upstream messages skipped as malformed")
NOTICES = Counter("fxproxy_ingestor_vendor_notices", "Non-tick texts received from upstream")
TICKS_PUBLISHED = Counter("fxproxy_ingestor_ticks_published", "Ticks published to the bus")
PUBLISH_ERRORS = Counter("fxproxy_ingestor_publish_errors", "Failed publish round trips")
DROPPED = Counter("fxproxy_ingestor_ticks_dropped", "Ticks dropped because the queue was full")
SESSION_FAILURES = Counter("fxproxy_ingestor_upstream_session_failures",
                           "Upstream sessions that ended with an unexpected error (reopened)")
RECONNECTS = Counter("fxproxy_ingestor_upstream_reconnects", "Upstream connection attempts after a loss")
UPSTREAM_UP = Gauge("fxproxy_ingestor_upstream_connected", "1 while every upstream session is logged in")
UPSTREAM_SYMBOLS = Gauge("fxproxy_ingestor_upstream_symbols", "Symbols streamed from upstream now")
QUEUE = Gauge("fxproxy_ingestor_publish_queue", "Ticks waiting to be published")
LEADER = Gauge("fxproxy_ingestor_leader", "1 while this ingestor holds the leader lease")
BUS_UP = Gauge("fxproxy_ingestor_bus_up", "1 while Redis answers a ping within its deadline")
