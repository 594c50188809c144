"""Single flight with `lock.coalesce` (docs/semantics.md), run by tests/test_coalesce.py."""

from __future__ import annotations

import anyio

from keyedlock_asgi import KeyedLock

lock = KeyedLock()
queries: list[int] = []


async def load_user(user_id: int) -> dict[str, int]:
    queries.append(user_id)
    await anyio.sleep(0.01)  # a slow query
    return {"id": user_id}


async def profile_page() -> dict[str, int]:
    # --8<-- [start:coalesce]
    user = await lock.coalesce("user:42", load_user, 42)  # fn may be sync or async
    # --8<-- [end:coalesce]
    return user


async def ten_pages() -> tuple[int, int]:
    """Ten concurrent page views: how many got the user, how many queries ran."""
    users: list[dict[str, int]] = []

    async def view() -> None:
        users.append(await profile_page())

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(view)
    return len(users), len(queries)
