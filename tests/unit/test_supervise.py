"""What every vendor session shares, with a dialect that only pretends: a re-login for a new set
is immediate, a failure backs off."""

from __future__ import annotations

import asyncio

from ingestor import metrics
from ingestor.backoff import Backoff
from ingestor.vendors.base import Hooks
from ingestor.vendors.supervise import Relogin, Supervised


class Scripted(Supervised):
    """Each login runs the next step: "relogin" raises Relogin, "fail" an OSError, "stay" waits."""

    def __init__(self, steps: list[str]) -> None:
        super().__init__(["ws://vendor.invalid/"], ["EURUSD"], Hooks(lambda q: None),
                         backoff=Backoff(5.0, 5.0))
        self.steps = steps
        self.logins: list[str] = []

    def _changed(self, old: frozenset[str]) -> None:
        pass

    async def _connect(self, url: str) -> None:
        step = self.steps.pop(0)
        self.logins.append(step)
        self._logged_in(url)
        if step == "relogin":
            raise Relogin()
        if step == "fail":
            raise OSError("link lost")
        await asyncio.Event().wait()


async def test_relogin_logs_in_again_at_once_without_backoff_or_a_reconnect_counted() -> None:
    session = Scripted(["relogin", "relogin", "stay"])
    before = metrics.RECONNECTS._value.get()
    task = asyncio.create_task(session.run())
    try:
        for _ in range(100):
            if session.logins == ["relogin", "relogin", "stay"]:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    # A failure would wait out its 2.5-5 s backoff; two re-logins took none.
    assert session.logins == ["relogin", "relogin", "stay"]
    assert session._backoff.attempt == 0 and metrics.RECONNECTS._value.get() == before


async def test_a_failed_login_backs_off() -> None:
    session = Scripted(["fail", "stay"])
    task = asyncio.create_task(session.run())
    await asyncio.sleep(0.2)
    task.cancel()
    assert session.logins == ["fail"] and session._backoff.attempt == 1
