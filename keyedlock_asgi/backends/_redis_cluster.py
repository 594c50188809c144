"""Wake-up channels on Redis Cluster: sharded pub/sub, one SSUBSCRIBE connection per master.

On a cluster a script may publish only to a shard channel of its own slot (SPUBLISH to another
slot is refused as a non-local key). So a process listens, for each slot it waits in, on
`{<tag>}<namespace>:wake:<process id>`, where `<tag>` is the shortest decimal string that hashes
to that slot: the same table in every process, so a releasing script names the waiter's
channel from the lock key's slot and the waiter's process id alone.

Cost: one SSUBSCRIBE round trip the first time a process waits in a slot (then the channel
stays, at most one per slot), one pub/sub connection per master the process waits on, and a
message that travels only inside its shard (plain PUBLISH on a cluster is broadcast to every
node). redis-py's own asyncio `ClusterPubSub` is not used: it reads its node connections one
after another, each with its own timeout, which delays a hand-off on one shard while it waits
on another. A listener whose connection breaks wakes every parked waiter of the process (they
ask Redis again) and resubscribes when the node is back (redis-py does that on reconnect); a
slot that moved is followed on the next wait in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

__all__ = ["ShardWakeups", "channel_prefix"]

logger = logging.getLogger("keyedlock_asgi.redis")


@functools.cache
def _slot_tags() -> tuple[str, ...]:
    """For each slot, the first decimal string that hashes to it (built once, ~0.1 s)."""
    tags: dict[int, str] = {}
    number = 0
    while len(tags) < REDIS_CLUSTER_HASH_SLOTS:
        text = str(number)
        tags.setdefault(key_slot(text.encode()), text)
        number += 1
    return tuple(tags[slot] for slot in range(REDIS_CLUSTER_HASH_SLOTS))


def channel_prefix(namespace: str, slot: int) -> str:
    """The wake-up channels of `slot`, without the process id: they hash to `slot`."""
    return f"{{{_slot_tags()[slot]}}}{namespace}:wake:"


class _Listener:
    """One master's pub/sub connection and the task reading it."""

    def __init__(self, node: ClusterNode) -> None:
        pool = aioredis.ConnectionPool(
            connection_class=node.connection_class, max_connections=2, **node.connection_kwargs
        )
        self.client = aioredis.Redis(connection_pool=pool)
        self.pubsub: Any = self.client.pubsub()
        self.reader: asyncio.Task[None] | None = None
        self.channels: set[str] = set()

    async def aclose(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.pubsub.aclose()
        with contextlib.suppress(Exception):
            await self.client.aclose()


class ShardWakeups:
    """One process's wake-up channels on a cluster, subscribed slot by slot as it waits."""

    def __init__(
        self,
        cluster: RedisCluster,
        namespace: str,
        proc_id: str,
        deliver: Callable[[str], None],
        wake_all: Callable[[], None],
    ) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.proc_id = proc_id
        self._deliver = deliver
        self._wake_all = wake_all
        self._listeners: dict[str, _Listener] = {}  # by node name
        self._where: dict[str, str] = {}  # channel -> node name it is subscribed on
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        self._lock = asyncio.Lock()

    def _node(self, key: str) -> ClusterNode:
        node = self.cluster.get_node_from_key(key)
        if node is None:
            raise redis_errors.SlotNotCoveredError(f"no node serves the slot of {key!r}")
        return node

    def prefix_for(self, redis_key: str) -> str:
        return channel_prefix(self.namespace, key_slot(redis_key.encode()))

    def listening(self, redis_key: str) -> bool:
        """Whether this process's channel in `redis_key`'s slot is subscribed on its owner."""
        channel = self.prefix_for(redis_key) + self.proc_id
        try:
            node = self.cluster.get_node_from_key(channel)
        except redis_errors.RedisError:  # no node known for the slot: `listen` will say so
            return False
        return node is not None and self._where.get(channel) == node.name

    async def listen(self, redis_key: str, limit: float = 5.0) -> None:
        """Be subscribed (confirmed) to this process's channel in `redis_key`'s slot."""
        channel = self.prefix_for(redis_key) + self.proc_id
        async with self._lock:
            node = self._node(channel)
            old = self._where.get(channel)
            if old == node.name:
                return
            if old is not None:
                await self._forget(channel, old)
            listener = self._listeners.get(node.name)
            if listener is None:
                listener = self._listeners[node.name] = _Listener(node)
            confirmed = self._confirmed[channel] = asyncio.get_running_loop().create_future()
            try:
                await listener.pubsub.ssubscribe(channel)
                if listener.reader is None:
                    listener.reader = asyncio.get_running_loop().create_task(self._read(listener))
                await asyncio.wait_for(asyncio.shield(confirmed), limit)
            except asyncio.TimeoutError:
                raise redis_errors.TimeoutError(
                    f"no confirmation of SSUBSCRIBE {channel}"
                ) from None
            finally:
                self._confirmed.pop(channel, None)
            listener.channels.add(channel)
            self._where[channel] = node.name

    async def _forget(self, channel: str, node_name: str) -> None:
        """The slot moved: stop listening there (best effort: that node may be gone)."""
        self._where.pop(channel, None)
        listener = self._listeners.get(node_name)
        if listener is None:
            return
        listener.channels.discard(channel)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(listener.pubsub.sunsubscribe(channel), 1.0)
        if not listener.channels:
            del self._listeners[node_name]
            await listener.aclose()

    async def _read(self, listener: _Listener) -> None:
        """Deliver this master's messages; after a broken connection, everyone asks again."""
        pause = 0.05
        broken = False
        while True:
            try:
                message = await listener.pubsub.get_message(timeout=10.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                if not broken:
                    logger.warning(
                        "Redis Cluster wake-up channel lost; reconnecting", exc_info=True
                    )
                broken = True
                self._wake_all()
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)
                continue
            if broken:
                broken, pause = False, 0.05
                logger.info("Redis Cluster wake-up channel back")
                self._wake_all()
            if message is None:
                continue
            kind = message["type"]
            kind = kind.decode() if isinstance(kind, bytes) else kind
            channel = message["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else str(channel)
            if kind == "ssubscribe":
                future = self._confirmed.get(channel)
                if future is not None and not future.done():
                    future.set_result(None)
            elif kind in ("smessage", "message"):
                data = message["data"]
                self._deliver(data.decode() if isinstance(data, bytes) else str(data))

    async def aclose(self) -> None:
        listeners, self._listeners = list(self._listeners.values()), {}
        self._where.clear()
        for listener in listeners:
            await listener.aclose()
