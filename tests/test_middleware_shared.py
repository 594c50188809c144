"""`shared_methods`: reads of one key run together, writes alone, in arrival order (recorded)."""

from __future__ import annotations

import anyio
import pytest

from keyedlock_asgi import KeyedLock, KeyedLockMiddleware, keys
from tests.support.lockwatch import Timeline
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio


async def test_reads_share_the_key_and_a_write_waits_for_them() -> None:
    lock = KeyedLock()
    timeline = Timeline()
    release: dict[str, anyio.Event] = {}
    inside: set[str] = set()

    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        name = scope["path"].strip("/")
        timeline.enter("doc", name)
        inside.add(name)
        await release[name].wait()
        inside.discard(name)
        timeline.leave("doc", name)

    wrapped = KeyedLockMiddleware(
        app, key=keys.header("X-Doc"), lock=lock, shared_methods=["get", "HEAD"]
    )

    async def request(method: str, name: str) -> None:
        release[name] = anyio.Event()
        scope = {
            "type": "http",
            "method": method,
            "path": f"/{name}",
            "headers": [(b"x-doc", b"1")],
        }

        async def receive() -> dict:  # type: ignore[type-arg]
            await anyio.sleep_forever()
            raise AssertionError

        async def send(message: dict) -> None:  # type: ignore[type-arg]
            pass

        await wrapped(scope, receive, send)

    async with anyio.create_task_group() as tg:
        tg.start_soon(request, "GET", "r1")
        tg.start_soon(request, "HEAD", "r2")
        await wait_until(lambda: inside == {"r1", "r2"}, "r1, r2 inside")  # two reads at once
        tg.start_soon(request, "POST", "w")
        await wait_until(lambda: lock.waiting("1") == 1, 'lock.waiting("1") == 1')
        tg.start_soon(request, "GET", "r3")  # behind the write
        await wait_until(lambda: lock.waiting("1") == 2, 'lock.waiting("1") == 2')
        release["r1"].set()
        release["r2"].set()
        await wait_until(lambda: inside == {"w"}, 'inside == {"w"}')
        release["w"].set()
        await wait_until(lambda: inside == {"r3"}, 'inside == {"r3"}')
        release["r3"].set()
    entries = timeline.entries()
    assert sorted(entries[:2]) == ["r1", "r2"]
    assert entries[2:] == ["w", "r3"]
    for other in ("r1", "r2", "r3"):
        assert not timeline.overlapped("w", other)
    assert lock.stats().active_keys == 0


def test_shared_methods_takes_a_list() -> None:
    with pytest.raises(TypeError):
        KeyedLockMiddleware(lambda s, r, t: None, key=keys.header("x"), shared_methods="GET")  # type: ignore[arg-type]
