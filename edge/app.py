"""Wires one edge process: bus subscriber, hub, server, keepalive, drain on stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.exceptions import RedisError

from edge.auth import Authenticator
from edge.server import EdgeServer
from edge.workgroup import WorkerGroup
from shared.bus import Bus
from shared.demand import DemandStore
from shared.keystore import KeyStore
from shared.settings import EdgeSettings
from shared.tasks import cancel_all, until_stopped

log = logging.getLogger("fxproxy.edge")


class EdgeApp:
    def __init__(self, settings: EdgeSettings, bus: Bus, keystore: KeyStore | None,
                 demand: DemandStore | None = None, group: WorkerGroup | None = None) -> None:
        self.settings = settings
        # A worker's id was made unique by its supervisor; a lone edge makes its own.
        self.server = EdgeServer(settings, bus, Authenticator(keystore, settings.api_keys), demand,
                                 settings.edge_id if group is not None else "")
        self.group = group
        if group is not None:  # one of several workers: answer /readyz and /metrics for all
            server = self.server
            server.on_ready = group.set_ready
            server.readyz = lambda: server.ready() and group.all_ready()
            server.metrics_page = group.render_metrics
        self._listener: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> int:
        """Listen and subscribe; return the bound port."""
        server = self.server
        subscriber = server.bus.subscriber(server.hub.on_tick, server.on_control, server.on_bus_state,
                                           server.on_bus_resubscribed, server.on_bus_away)
        server.hub.subscriber = subscriber
        if self.group is not None and self.group.predecessor:
            await self._forget(self.group.predecessor)
        loop = asyncio.get_running_loop()
        # Bound before any background task exists, so a port in use fails the start at once
        # (tasks cancelled mid-connect by the runner's teardown could hang it). Workers each
        # bind the same port; the kernel spreads new connections over them.
        self._listener = await loop.create_server(
            server.protocol_factory, self.settings.host, self.settings.port, backlog=4096,
            reuse_port=self.group is not None or None,
        )
        # Each runs until stop(): one that ends sooner is a failure (shared/tasks.py).
        jobs = {"bus subscriber": subscriber.run(), "hub": server.hub.run(),
                "keepalive": server.keepalive(), "lag probes": server.lag_probes(),
                "bus probe": server.probe.run()}
        if server.auth.store is not None or server.demand is not None:
            jobs["heartbeat"] = server.heartbeat()
        if server.demand is not None:
            jobs["demand"] = server.demand.run()
        if self.group is not None:
            jobs["worker beat"] = self.group.beat()
        self._tasks = [asyncio.create_task(job, name=name) for name, job in jobs.items()]
        port: int = self._listener.sockets[0].getsockname()[1]
        extra: dict[str, object] = {"host": self.settings.host, "port": port}
        if self.group is not None:
            self.group.listening = True
            extra.update(worker=self.group.worker_id, edge_id=server.edge_id)
        log.info("edge listening", extra=extra)
        return port

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        """The background tasks, each meant to run until stop()."""
        return list(self._tasks)

    async def _forget(self, edge_id: str) -> None:
        """Free the connection slots of the dead worker this one replaces."""
        store = self.server.auth.store
        if store is None:
            return
        try:
            async with asyncio.timeout(2):  # never hold up the start for it
                await store.forget_edge(edge_id)
        except (RedisError, OSError, TimeoutError) as exc:  # they free themselves after 3 heartbeats
            log.warning("could not free a dead worker's slots", extra={"error": str(exc)})
            return
        log.info("freed a dead worker's slots", extra={"edge_id": edge_id})

    async def stop(self, drain_timeout: float | None = None) -> None:
        timeout = self.settings.drain_timeout if drain_timeout is None else drain_timeout
        if self._listener is not None:
            self._listener.close()  # no new TCP connections while the old ones leave
        await self.server.drain(timeout)
        await cancel_all(self._tasks)
        if self.server.demand is not None:
            # Our clients are gone: stop asking for their symbols now rather than after the TTL.
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await asyncio.wait_for(self.server.demand.withdraw(), 1.0)
        log.info("edge stopped")


async def run_edge(
    settings: EdgeSettings, bus: Bus, keystore: KeyStore | None, stop: asyncio.Event,
    demand: DemandStore | None = None, group: WorkerGroup | None = None,
) -> None:
    """Serve until `stop` is set; TaskEnded (after draining) if a background task ends first."""
    app = EdgeApp(settings, bus, keystore, demand, group)
    await app.start()
    try:
        await until_stopped(stop, app.tasks, log)
    finally:
        await app.stop()
