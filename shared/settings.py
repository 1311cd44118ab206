"""Process settings: one pydantic-settings model per process, env prefix FXPROXY_."""

from __future__ import annotations

import os
import socket
import uuid
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.keystore import SYMBOL_GLOB_RE

# Lists arrive as "a,b,c" in env vars and flags; NoDecode stops pydantic-settings
# from insisting on JSON so the validator below can split them.
CsvList = Annotated[list[str], NoDecode]


def split_csv(value: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']"""
    return [part.strip() for part in value.split(",") if part.strip()]


def _split_csv(value: Any) -> Any:
    return split_csv(value) if isinstance(value, str) else value


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FXPROXY_", extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis URL of the bus: redis:// or rediss:// (one "
        "Redis), redis+cluster://HOST:PORT[,HOST:PORT...] (Redis Cluster), "
        "redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER[/DB] (Sentinel)"
    )
    prefix: str = Field("fx:", description="Prefix of every Redis key and channel")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level"
    )
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="json: one object a line; console: readable; auto: console on a TTY"
    )

    @field_validator("prefix")
    @classmethod
    def _prefix_outside_hash_tags(cls, value: str) -> str:
        # On a cluster the names put the symbol in a hash tag after the prefix: a brace in the
        # prefix would become the tag instead, putting every symbol in one slot (and garbling
        # the symbol read back from a channel name).
        if "{" in value or "}" in value:
            raise ValueError(f"{value!r} holds '{{' or '}}', which Redis Cluster reads as a hash tag: "
                             "use letters, digits, ':', '_' or '-'")
        return value


def parse_workers(value: Any) -> int:
    """FXPROXY_WORKERS: a positive number, or 'auto' for the CPUs this process may run on."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return len(os.sched_getaffinity(0))
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ValueError(f"bad workers {text[:20]!r}: use a number of processes (1 or more) or 'auto'")
    return int(text)


class EdgeSettings(CommonSettings):
    host: str = Field("0.0.0.0", description="Address the edge listens on")
    port: int = Field(8080, ge=0, le=65535, description="Port for WebSocket, health and metrics (0 = any)")
    edge_id: str = Field("", description="Name of this edge in the cluster (default: the host name); "
                         "each process adds a random suffix of its own")
    api_keys: CsvList = Field(
        default_factory=list, repr=False, description="Static API keys (dev only), comma-separated"
    )
    handshake_timeout: float = Field(10.0, gt=0, description="Seconds to finish the HTTP handshake")
    auth_timeout: float = Field(10.0, gt=0, description="Seconds to send the auth frame")
    max_frame_size: int = Field(4096, ge=128, description="Largest client frame in bytes (1009)")
    max_subscriptions: int = Field(200, ge=1, description="Symbols one connection may hold")
    max_symbols_per_request: int = Field(100, ge=1, description="Symbols in one subscribe frame")
    max_connections: int = Field(10000, ge=1, description="Connections this edge accepts")
    allowed_origins: CsvList = Field(
        default_factory=list, description="Allowed Origin headers; empty allows any"
    )
    trusted_proxies: CsvList = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"],
        description="CIDRs whose X-Forwarded-For / X-Real-IP are believed",
    )
    handshake_rate: float = Field(20.0, gt=0, description="Handshakes per second per client IP")
    handshake_burst: int = Field(40, ge=1, description="Handshake burst per client IP")
    op_rate: float = Field(10.0, gt=0, description="Client frames per second per connection")
    op_burst: int = Field(30, ge=1, description="Client frame burst per connection")
    max_strikes: int = Field(
        10, ge=1, description="Rejected frames (errors, rate limit) before closing with 1008"
    )
    write_delay: float = Field(
        0.0, ge=0, le=1, description="Seconds to hold a client's frames so they leave in one write"
    )
    write_buffer: int = Field(
        256 * 1024, ge=4096, description="Bytes queued to a client before it counts as slow"
    )
    slow_client_timeout: float = Field(
        5.0, gt=0, description="Seconds a client may stay slow (conflated) before 1013"
    )
    ping_interval: float = Field(20.0, gt=0, description="Seconds between keepalive pings")
    heartbeat_interval: float = Field(
        5.0, gt=0, description="Seconds between edge heartbeats; a key's slots on an edge silent "
        "for three of them are freed"
    )
    drain_timeout: float = Field(10.0, ge=0, description="Seconds to shed clients on SIGTERM")
    replay_limit: int = Field(1000, ge=0, description="Most ticks replayed for a `since` resume")
    repair_timeout: float = Field(
        2.0, gt=0, description="Seconds a symbol's live ticks wait while a bus gap is filled from "
        "history; then clients get a reset"
    )
    max_lag: float = Field(
        2.0, gt=0, description="Seconds a client may read behind before its ticks are conflated "
        "(measured with pings); behind for the slow-client timeout means 1013"
    )
    max_pending_handshakes: int = Field(
        1000, ge=1, description="TCP connections allowed to be mid-handshake at once"
    )
    max_handshake_bytes: int = Field(
        16384, ge=1024, description="Largest HTTP upgrade request (request line and headers) in bytes"
    )
    workers: int = Field(
        1, description="Processes sharing the port (SO_REUSEPORT) under a supervisor; 'auto' = one "
        "per CPU; 1 = a single process, no supervisor"
    )

    @field_validator("api_keys", "allowed_origins", "trusted_proxies", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        return parse_workers(value)

    @field_validator("workers")
    @classmethod
    def _one_port_for_all_workers(cls, value: int, info: ValidationInfo) -> int:
        if value > 1 and info.data.get("port") == 0:
            # Each worker binds on its own: with port 0 the kernel would give each a different one.
            raise ValueError("port 0 (any) needs workers 1: give the port the workers share")
        return value

    def resolved_edge_id(self) -> str:
        """The name plus a suffix of this process's own: a container restarted in place under
        the same name must not take over the connection slots its dead predecessor held."""
        return f"{self.edge_id or socket.gethostname()}-{uuid.uuid4().hex[:8]}"


Dialect = Literal["tradermade", "kabu"]
KABU_MAX_SYMBOLS = 50  # kabuステーション's API registration list holds at most 50 symbols


class IngestorSettings(CommonSettings):
    upstream_dialect: Dialect = Field(
        "tradermade", description="Vendor dialect: tradermade (login over the WebSocket) or kabu "
        "(kabuステーション: token and registration over REST, board pushes over a WebSocket)"
    )
    upstream_urls: CsvList = Field(
        default_factory=list, description="Upstream URLs, comma-separated. tradermade: WebSocket URLs, "
        "tried in order; kabu: REST bases (http://host:18080/kabusapi), one kabuステーション per session"
    )
    upstream_key: SecretStr = Field(
        SecretStr(""), description="Vendor API key (tradermade userKey, kabu API password)"
    )
    upstream_max_symbols: int = Field(
        0, ge=0, description="Symbols one upstream session may carry (0 = no limit; kabu: 50 at most)"
    )
    upstream_max_connections: int = Field(
        1, ge=1, description="Upstream sessions the vendor allows; symbols are spread over as few as fit"
    )
    upstream_headers: dict[str, str] = Field(
        default_factory=dict, description='Extra upstream handshake headers, JSON: {"X-A":"b"}'
    )
    symbols: CsvList = Field(default_factory=list, description="Symbols to stream, comma-separated")
    on_demand: CsvList = Field(
        default_factory=list, description="Globs of further symbols clients may call up, streamed "
        "while some edge wants them, e.g. 'XAU*,USD???'; empty = only the static symbols"
    )
    demand_grace: float = Field(
        30.0, ge=0, description="Seconds an on-demand symbol nobody wants any more stays streamed"
    )
    silence_timeout: float = Field(
        10.0, gt=0, description="Seconds without upstream data before it counts as dead"
    )
    backoff_initial: float = Field(0.5, gt=0, description="First reconnect delay in seconds")
    backoff_max: float = Field(30.0, gt=0, description="Longest reconnect delay in seconds")
    history_len: int = Field(1000, ge=1, description="Ticks kept per symbol for gap recovery")
    node_id: str = Field("", description="Id of this ingestor in leader election (default: host-random)")
    leader_ttl: float = Field(
        5.0, gt=0, description="Seconds the leader's lease lasts; a standby takes over this long "
        "after the leader dies"
    )
    metrics_host: str = Field("0.0.0.0", description="Address of the metrics/health endpoint")
    metrics_port: int = Field(9102, ge=0, le=65535, description="Metrics port (0 = off)")

    def resolved_node_id(self) -> str:
        return self.node_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"

    def symbols_per_session(self) -> int:
        """The per-session cap in force (0 = none): kabu's registration list is never unlimited."""
        if self.upstream_dialect == "kabu":
            return self.upstream_max_symbols or KABU_MAX_SYMBOLS
        return self.upstream_max_symbols

    @model_validator(mode="after")
    def _vendor_limits(self) -> IngestorSettings:
        if self.upstream_dialect == "kabu":
            if self.upstream_max_symbols > KABU_MAX_SYMBOLS:
                raise ValueError(f"FXPROXY_UPSTREAM_MAX_SYMBOLS={self.upstream_max_symbols}: kabu "
                                 f"registers at most {KABU_MAX_SYMBOLS} symbols per session")
            odd = [s for s in self.symbols if "@" not in s]
            if odd:
                raise ValueError(f"FXPROXY_SYMBOLS: kabu symbols are code@exchange, e.g. 9433@1, "
                                 f"not {', '.join(odd[:3])}")
            if self.upstream_urls and len(self.upstream_urls) < self.upstream_max_connections:
                raise ValueError(f"FXPROXY_UPSTREAM_MAX_CONNECTIONS={self.upstream_max_connections} "
                                 f"kabu sessions need as many FXPROXY_UPSTREAM_URLS (one kabuステーション "
                                 f"each), got {len(self.upstream_urls)}")
        return self

    @field_validator("upstream_urls", "symbols", "on_demand", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("on_demand")
    @classmethod
    def _globs(cls, value: list[str]) -> list[str]:
        bad = [g for g in value if SYMBOL_GLOB_RE.fullmatch(g) is None]
        if bad:
            raise ValueError(f"bad symbol glob(s) {', '.join(bad)}: use A-Z 0-9 * ? @ (symbols are "
                             "upper case), e.g. 'XAU*,USD???'")
        return value

    @field_validator("symbols")
    @classmethod
    def _symbols_upper(cls, value: list[str]) -> list[str]:
        return [s.upper() for s in value]


class SimfeedSettings(CommonSettings):
    dialect: Dialect = Field(
        "tradermade", description="Vendor to simulate: tradermade (WebSocket login) or kabu "
        "(kabuステーション REST + PUSH under /kabusapi)"
    )
    host: str = Field("127.0.0.1", description="Address the simulated feed listens on")
    port: int = Field(9100, ge=0, le=65535, description="Port of the simulated feed")
    key: SecretStr = Field(
        SecretStr("demo-upstream-key"), description="userKey (tradermade) or API password (kabu) accepted"
    )
    rate: float = Field(10.0, gt=0, description="Ticks per second per subscribed symbol")
    max_connections: int = Field(
        0, ge=0, description="tradermade: logged-in connections allowed at once, like a vendor's (0 = any)"
    )
    max_symbols: int = Field(
        0, ge=0, description="Symbols per session (tradermade, 0 = any) or registered at once "
        f"(kabu, 0 = {KABU_MAX_SYMBOLS}); more are refused like the vendor does"
    )
    token_ttl: float = Field(
        0.0, ge=0, description="kabu: seconds a token lasts; then it is revoked, registrations are "
        "dropped and push sockets closed, as at kabuステーション's forced logout (0 = never)"
    )
    quiet: CsvList = Field(
        default_factory=list, description="tradermade: symbols carried (added to the catalogue if "
        "missing) but never quoted, like a market that stopped moving; comma-separated"
    )

    @field_validator("quiet", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)
