"""The suite's one wait helper: it returns the condition's value, plain or async, on asyncio and
trio, and a condition that never holds fails loudly with its name instead of hanging."""

from __future__ import annotations

import anyio
import pytest

from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio


async def test_returns_the_first_truthy_value_of_a_plain_condition() -> None:
    seen: list[int] = []

    async def count() -> None:
        for n in range(5):
            seen.append(n)
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(count)
        assert await wait_until(lambda: len(seen) >= 3 and seen[2], "three counted") == 2


async def test_awaits_an_async_condition() -> None:
    polls = 0

    async def remote() -> str:
        nonlocal polls
        polls += 1
        return "ready" if polls == 3 else ""

    assert await wait_until(remote, "the server is ready") == "ready"
    assert polls == 3


async def test_a_condition_that_never_holds_fails_naming_it() -> None:
    with pytest.raises(AssertionError, match=r"never reached within 0\.05 s: the moon is cheese"):
        await wait_until(lambda: False, "the moon is cheese", limit=0.05)
