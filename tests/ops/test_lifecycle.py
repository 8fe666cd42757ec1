"""ops/daemon.py in-process: components start after the listeners and stop before the drain (reverse order), a
request in flight at stop() still gets its reply, reloads run one at a time and a failing one keeps the daemon up,
on_shutdown runs last."""
from __future__ import annotations

import asyncio

import pytest

from edge_runtime.ops.daemon import Daemon
from edge_runtime.rpc.client import AsyncClient
from edge_runtime.rpc.methods import MethodTable


class Recorder:
    def __init__(self, name: str, events: list):
        self.name, self.events = name, events

    async def start(self, server) -> None:
        self.events.append(f"start {self.name} port={server.tcp_port is not None}")

    async def stop(self) -> None:
        self.events.append(f"stop {self.name}")


def test_daemon_lifecycle_drains_and_orders_components():
    events: list[str] = []
    reloads: list[int] = []

    async def slow(p: dict) -> dict:
        await asyncio.sleep(0.3)
        return {"slept": True}

    async def reload() -> None:
        reloads.append(len(reloads))
        await asyncio.sleep(0.05)
        if len(reloads) == 2:
            raise RuntimeError("bad config")

    methods = MethodTable({"slow": (slow, True), "health": (lambda p: {"status": "ok"}, False)})
    daemon = Daemon(methods, host="127.0.0.1", port=0, components=[Recorder("a", events), Recorder("b", events)],
                    reload=reload, on_shutdown=[lambda: events.append("shutdown")], drain_timeout=5.0, name="test")

    async def go():
        task = asyncio.ensure_future(daemon.run())
        while not daemon.addresses or len(events) < 2:
            await asyncio.sleep(0.01)
        port = daemon.server.tcp_port
        c = await AsyncClient.connect("127.0.0.1", port, 5.0)
        assert await c.call("health") == {"status": "ok"}
        await asyncio.gather(daemon.do_reload(), daemon.do_reload(), daemon.do_reload())
        pending = asyncio.ensure_future(c.call("slow"))
        await asyncio.sleep(0.05)           # the request is in flight
        daemon.stop()
        assert await pending == {"slept": True}    # drained, not dropped
        await asyncio.wait_for(task, 10)
        await c.close()
        with pytest.raises(OSError):
            await AsyncClient.connect("127.0.0.1", port, 1.0)

    asyncio.run(go())
    assert events == ["start a port=True", "start b port=True", "stop b", "stop a", "shutdown"]
    assert reloads == [0, 1, 2]     # one at a time; the failing second one did not stop the third
