"""`RedisBackend`: the same keyed lock across worker processes and hosts, through Redis.

How one grant works (see `_redis_scripts` for the atomic steps):
- `KeyedLock` queues callers in-process first, so each process sends at most `max_concurrency`
  callers per key to Redis.
- ACQUIRE either grants the key (a leased holder entry plus a fencing token) or puts the caller
  in a FIFO queue in Redis. The caller then parks on a future that the process's single pub/sub
  reader resolves, or a fallback timer fires: min(the first lease's remaining time, `heartbeat`,
  half the claim lease). Then it calls ACQUIRE again, which also proves it is alive. No polling
  loop, no lost wake-up: the future is registered before each call.
- Direct hand-off: RELEASE (and any script that finds an ended lease) makes the head waiter a
  holder itself, with a short claim lease, and publishes `"<token> <fence> <claim ms>"` to that
  waiter's process. The parked waiter holds the key as soon as the message arrives, with no
  second round trip, and renews the claim to a full lease. A lost message is found by the
  fallback ACQUIRE ("already ours"); a waiter cancelled or timed out meanwhile passes the grant
  on with RELEASE; a waiter whose process died holds it until the claim ends.
- In-process hand-off (`acquire_after`): when the in-process lock hands an ended hold's key to
  the next caller of the same process, the lease goes along, and that caller's ACQUIRE releases
  it before it grants or queues as usual: one round trip, not RELEASE then ACQUIRE.
- A holder's lease is renewed every `lease / 3` while it holds, up to `max_hold` (a claim is
  renewed within a third of its length).
- RELEASE (also used to leave the queue) removes the token and hands the key on; it runs
  shielded from cancellation.
- A circuit breaker turns a dead Redis into fast `BackendUnavailable` errors with `retry_after`.
- Shared holds: the mode travels in the token; the scripts grant runs of shared waiters (see
  `_redis_scripts`).
- Redis Cluster (a `RedisCluster` client, redis-py >= 8.0): every key of one lock key is in one
  slot; wake-ups use sharded pub/sub (`_redis_cluster`), and each master has its own breaker.

redis-py's asyncio client is asyncio-only: this backend refuses to run under trio.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import uuid
import weakref
from collections.abc import Callable, Sequence
from time import monotonic
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio

from .._errors import BackendUnavailable, LockBusy, LockTimeout
from . import BackendLease, LeaseLost, _redis_scripts

try:
    import redis.asyncio as aioredis
    from redis import exceptions as redis_errors
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    from ._redis_cluster import ShardWakeups
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("RedisBackend needs redis-py: pip install 'keyedlock_asgi[redis]'") from exc

Client = aioredis.Redis | RedisCluster

_CLUSTER_NEEDS = (
    "RedisBackend on Redis Cluster needs redis-py >= 8.0 (sharded pub/sub in redis.asyncio); "
    "pip install -U 'redis>=8'"
)


def _check_cluster_support() -> None:
    """Refuse a cluster client up front when redis-py cannot SSUBSCRIBE from asyncio."""
    if not hasattr(aioredis.client.PubSub, "ssubscribe"):
        raise RuntimeError(_CLUSTER_NEEDS)


__all__ = ["LeaseLost", "RedisBackend", "RedisLease"]

logger = logging.getLogger("keyedlock_asgi.redis")

_CONNECTIVITY_ERRORS = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)
# A cluster whose shard for the key is down (no replica took over yet).
_CLUSTER_DOWN: tuple[type[Exception], ...] = (
    redis_errors.ClusterDownError,
    redis_errors.SlotNotCoveredError,
    redis_errors.TryAgainError,
    redis_errors.MasterDownError,
)
# A full pool is local saturation, not an outage (the class is missing in old redis-py).
_POOL_FULL: tuple[type[Exception], ...] = tuple(
    getattr(redis_errors, name) for name in ("MaxConnectionsError",) if hasattr(redis_errors, name)
)


def _running_under_trio() -> bool:
    import sys

    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


_TRIO_MESSAGE = (
    "RedisBackend runs on asyncio only (redis-py's asyncio client); "
    "run the app on asyncio or use the in-process KeyedLock under trio"
)


class _Breaker:
    """After `threshold` connection failures in a row, fail fast for `cooldown` seconds.

    Then one probe at a time is let through: its success closes the breaker, its failure
    reopens it.
    """

    __slots__ = ("cooldown", "failures", "open_until", "probing", "threshold")

    def __init__(self, threshold: int, cooldown: float) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self.open_until = 0.0
        self.probing = False

    def is_open(self) -> bool:
        return self.failures >= self.threshold and (self.probing or monotonic() < self.open_until)

    def enter(self) -> bool:
        """Raise `BackendUnavailable` if open; return whether this call is the probe."""
        if self.failures < self.threshold:
            return False
        if monotonic() < self.open_until:
            raise _unavailable("the lock service is unavailable (circuit open)", self.retry_after())
        if self.probing:
            raise _unavailable("the lock service is unavailable (probing)", self.cooldown)
        self.probing = True
        return True

    def succeeded(self, probe: bool) -> None:
        self.failures = 0
        if probe:
            self.probing = False

    def failed(self, probe: bool) -> None:
        self.failures += 1
        if probe:
            self.probing = False
        if self.failures >= self.threshold:
            self.open_until = monotonic() + self.cooldown

    def abandoned(self, probe: bool) -> None:
        if probe:
            self.probing = False

    def retry_after(self) -> float:
        return max(self.open_until - monotonic(), 0.0) or self.cooldown


def _unavailable(message: str, retry_after: float) -> BackendUnavailable:
    error = BackendUnavailable(message)
    error.retry_after = retry_after
    return error


class _Connection:
    """One event loop's (and one process's) client, pub/sub reader and parked waiters."""

    def __init__(self, backend: RedisBackend, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pid = os.getpid()
        self.proc_id = uuid.uuid4().hex[:16]
        self.channel_prefix = f"{backend.namespace}:wake:"
        self.channel = self.channel_prefix + self.proc_id
        self.client: Client = backend._client_factory()
        self.owns_client = backend._owns_client
        # On a cluster: sharded pub/sub, a channel per slot (see _redis_cluster), and one
        # circuit breaker per master, so that a shard that is down fails only its own keys.
        self.shards: ShardWakeups | None = None
        self.publish = "PUBLISH"
        self.breakers: dict[str, _Breaker] = {}
        if isinstance(self.client, RedisCluster):
            self.publish = "SPUBLISH"
            self.shards = ShardWakeups(
                self.client, backend.namespace, self.proc_id, self.wake, self.wake_all
            )
        self.breaker = backend._breaker
        self.acquire = self.client.register_script(_redis_scripts.ACQUIRE)
        self.release = self.client.register_script(_redis_scripts.RELEASE)
        self.extend = self.client.register_script(_redis_scripts.EXTEND)
        self.pubsub: Any = None
        self.reader: asyncio.Task[None] | None = None
        self.ready: asyncio.Future[bool] | None = None
        # Parked waiters by token; resolved with a hand-off's (fence, claim ms), or _ASK_AGAIN.
        self.waiters: dict[str, asyncio.Future[tuple[int, int]]] = {}
        self.leases: set[RedisLease] = set()
        self.counter = itertools.count(1)

    def wake(self, message: str) -> None:
        """A script's message: `"<token> <fence> <claim ms>"` (handed the key), or anything
        else naming a token (ask Redis again)."""
        token, *grant = message.split(" ")
        future = self.waiters.get(token)
        if future is not None and not future.done():
            if len(grant) == 2 and grant[0].isdigit() and grant[1].isdigit():
                future.set_result((int(grant[0]), int(grant[1])))
            else:
                future.set_result(_ASK_AGAIN)

    def wake_all(self) -> None:
        for future in self.waiters.values():
            if not future.done():
                future.set_result(_ASK_AGAIN)

    def prefix_for(self, keys: list[str]) -> str:
        """The wake-up channel prefix the scripts of these keys publish to."""
        return self.channel_prefix if self.shards is None else self.shards.prefix_for(keys[0])

    def breaker_for(self, keys: list[str]) -> _Breaker:
        """The circuit breaker of the server that holds these keys."""
        if self.shards is None:
            return self.breaker
        assert isinstance(self.client, RedisCluster)
        try:
            node = self.client.get_node_from_key(keys[0])
        except redis_errors.RedisError:  # no node known for the slot (the map is being rebuilt)
            node = None
        name = "" if node is None else node.name
        breaker = self.breakers.get(name)
        if breaker is None:
            template = self.breaker
            breaker = self.breakers[name] = _Breaker(template.threshold, template.cooldown)
        return breaker


_ASK_AGAIN = (0, 0)


def _resolve(future: asyncio.Future[tuple[int, int]]) -> None:
    if not future.done():
        future.set_result(_ASK_AGAIN)


class RedisLease:
    """One key granted by Redis: renewed in the background until released or lost."""

    __slots__ = (
        "_backend",
        "_conn",
        "_granted_at",
        "_keys",
        "_renewal",
        "_slots",
        "_task",
        "_token_str",
        "_valid_until",
        "key",
        "lost",
        "on_lost",
        "released",
        "token",
    )

    def __init__(
        self,
        backend: RedisBackend,
        conn: _Connection,
        key: str,
        keys: list[str],
        token_str: str,
        fence: int,
        slots: int,
        sent_at: float,
        valid_for: float,
    ) -> None:
        self._backend = backend
        self._conn = conn
        self.key = key
        self._keys = keys
        self._token_str = token_str
        self.token = fence
        """The fencing token: strictly increasing per key across every grant."""
        self._slots = slots
        self._granted_at = sent_at
        self.on_lost: Callable[[LeaseLost], object] | None = None
        """Told of the loss right after the backend's `on_lease_lost` (the core revokes)."""
        # The earliest the lease can end: it began after `sent_at` (for a hand-off, after the
        # waiter's last ACQUIRE was sent), for `valid_for` seconds (a full lease or a claim).
        self._valid_until = sent_at + valid_for
        self.lost = False
        """Whether the lease ended while the hold was open (see `LeaseLost`)."""
        self.released = False
        self._task: asyncio.Task[None] | None = None
        # First renewal within a third of what is surely left (a claim: well before it ends).
        first = min(backend._renew_every, max(self._valid_until - monotonic(), 0.0) / 3)
        self._renewal: asyncio.TimerHandle | None = conn.loop.call_later(first, self._renew_due)
        conn.leases.add(self)

    def __repr__(self) -> str:
        state = "released" if self.released else "lost" if self.lost else "held"
        return f"<RedisLease {self.key!r} token={self.token} {state}>"

    async def release(self) -> None:
        """Give the key back (idempotent); a lease that was lost is still cleaned up."""
        if not self._let_go():
            return
        backend = self._backend
        try:
            with anyio.CancelScope(shield=True):
                await backend._run(
                    self._conn.release,
                    self._keys,
                    backend._release_args(self._token_str, self._conn, self._slots, self._keys),
                    self._conn,
                )
        except BackendUnavailable:
            logger.warning(
                "could not release a Redis lease; the key frees itself when the lease ends "
                "(within %.1f s)",
                max(self._valid_until - monotonic(), 0.0),
            )

    def _let_go(self) -> bool:
        """Stop renewing and tracking the lease, before the script that frees it in Redis is
        sent (a renewal racing that script would report a loss). False: already let go."""
        if self.released:
            return False
        self.released = True
        self._stop_renewal()
        self._conn.leases.discard(self)
        return True

    def _stop_renewal(self) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _renew_due(self) -> None:
        self._renewal = None
        if not self.released and not self.lost:
            self._task = self._conn.loop.create_task(self._renew())

    async def _renew(self) -> None:
        backend = self._backend
        now = monotonic()
        lease = backend.lease
        if backend.max_hold is not None:
            end = self._granted_at + backend.max_hold
            if self._valid_until >= end - 0.001 or end - now <= 0.001:
                # The lease already runs to max_hold: renewing would only race its end (and be
                # reported as "expired"). Report max_hold when it ends.
                self._schedule(max(self._valid_until - now, 0.0), "max_hold")
                return
            lease = min(lease, end - now)
        try:
            renewed = await backend._run(
                self._conn.extend,
                self._keys,
                [self._token_str, max(int(lease * 1000), 1), backend._meta_ttl_ms],
                self._conn,
            )
        except BackendUnavailable:
            if self.released:
                return
            left = self._valid_until - monotonic()
            if left <= 0:
                self._report("unreachable")
                return
            self._schedule(min(backend._renew_every, max(left / 3, 0.05)), None)
            return
        if self.released:
            return
        if not renewed:
            self._report("expired")
            return
        self._valid_until = now + lease
        self._schedule(min(backend._renew_every, lease / 3), None)

    def _schedule(self, delay: float, lost_reason: Literal["max_hold"] | None) -> None:
        self._task = None
        if lost_reason is None:
            self._renewal = self._conn.loop.call_later(delay, self._renew_due)
        else:
            self._renewal = self._conn.loop.call_later(delay, self._report, lost_reason)

    def _report(self, reason: Literal["expired", "max_hold", "unreachable"]) -> None:
        self._renewal = None
        if self.released or self.lost:
            return
        self.lost = True
        event = LeaseLost(self.key, self.token, reason, monotonic() - self._granted_at)
        logger.error(
            "lost the Redis lease of a held key (%s after %.1f s, fencing token %d): another "
            "process may now hold it",
            reason,
            event.held_for,
            self.token,
        )
        callback = self._backend.on_lease_lost
        if callback is not None:
            try:
                callback(event)
            except Exception:
                logger.exception("on_lease_lost callback failed")
        if self.on_lost is not None:
            self.on_lost(event)


class RedisBackend:
    """A Redis engine for `KeyedLock(backend=...)`: fair, notified, leased and fenced.

    Build it with `RedisBackend.from_url(url, ...)` (a client per event loop, connected on first
    use, closed by `aclose()`), or pass your own `redis.asyncio.Redis` or `RedisCluster` client
    (it is used on its own event loop only and never closed here).
    """

    def __init__(
        self,
        client: Client | Callable[[], Client],
        *,
        namespace: str = "keyedlock",
        lease: float = 30.0,
        max_hold: float | None = None,
        heartbeat: float = 1.0,
        key_ttl: float = 7 * 24 * 3600.0,
        breaker_threshold: int = 3,
        breaker_cooldown: float = 2.0,
        on_lease_lost: Callable[[LeaseLost], None] | None = None,
    ) -> None:
        if _running_under_trio():
            raise RuntimeError(_TRIO_MESSAGE)
        if not isinstance(namespace, str) or not namespace:
            raise ValueError("namespace must be a non-empty str")
        if not lease >= 0.1:
            raise ValueError("lease must be at least 0.1 seconds")
        if max_hold is not None and not max_hold >= lease:
            raise ValueError("max_hold must be None or at least the lease")
        if not heartbeat > 0:
            raise ValueError("heartbeat must be > 0")
        if not key_ttl >= 3600:
            raise ValueError("key_ttl must be at least one hour")
        if breaker_threshold < 1 or not breaker_cooldown > 0:
            raise ValueError("breaker_threshold must be >= 1 and breaker_cooldown > 0")
        if isinstance(client, RedisCluster):
            _check_cluster_support()
        if isinstance(client, (aioredis.Redis, RedisCluster)):
            given = client
            self._client_factory: Callable[[], Client] = lambda: given
            self._owns_client = False
        else:
            self._client_factory = client
            self._owns_client = True
        self.namespace = namespace
        self.lease = float(lease)
        self.max_hold = None if max_hold is None else float(max_hold)
        self.heartbeat = float(heartbeat)
        self.on_lease_lost = on_lease_lost
        self._renew_every = self.lease / 3
        self._lease_ms = int(self.lease * 1000)
        self._waiter_ttl_ms = int(3 * self.heartbeat * 1000) + 500
        # A waiter handed the key holds it at first for this long: no longer than a dead
        # waiter would have blocked the queue, nor than a lease.
        self._claim_ms = min(self._lease_ms, self._waiter_ttl_ms)
        self._claim = self._claim_ms / 1000
        self._meta_ttl_ms = int(key_ttl * 1000)
        # ACQUIRE's constant arguments, encoded once (redis-py would on every call).
        self._acquire_ms = [
            b"%d" % ms for ms in (self._lease_ms, self._waiter_ttl_ms, self._meta_ttl_ms)
        ]
        self._claim_arg = b"%d" % self._claim_ms
        self._breaker = _Breaker(breaker_threshold, breaker_cooldown)
        self._conns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Connection] = (
            weakref.WeakKeyDictionary()
        )

    @classmethod
    def from_url(
        cls,
        url: str | Sequence[str] = "redis://127.0.0.1:6379/0",
        *,
        cluster: bool = False,
        max_connections: int = 50,
        socket_timeout: float = 2.0,
        connect_timeout: float = 0.5,
        pool_timeout: float = 10.0,
        retries: int = 1,
        namespace: str = "keyedlock",
        lease: float = 30.0,
        max_hold: float | None = None,
        heartbeat: float = 1.0,
        key_ttl: float = 7 * 24 * 3600.0,
        breaker_threshold: int = 3,
        breaker_cooldown: float = 2.0,
        on_lease_lost: Callable[[LeaseLost], None] | None = None,
        **redis_options: Any,
    ) -> RedisBackend:
        """A backend for the Redis at `url`; extra keywords go to redis-py's connection pool.

        The lock's connections wait up to `pool_timeout` for a free pool slot
        (`BlockingConnectionPool`), use short socket timeouts and retry a failed command
        `retries` times: every script is idempotent by token, so a retry never takes a key twice.

        `cluster=True`: `url` is a startup node of a Redis Cluster (or a list of them), and
        the client is a `RedisCluster` (`max_connections` per node; extra keywords go to it).
        """
        if max_connections < 2:
            raise ValueError("max_connections must be at least 2 (one is the pub/sub reader)")
        if cluster:
            _check_cluster_support()
        urls = [url] if isinstance(url, str) else list(url)
        if not urls or (len(urls) > 1 and not cluster):
            raise ValueError("url: one URL, or a list of startup nodes with cluster=True")

        def retry() -> Retry:
            return Retry(ExponentialBackoff(cap=0.1, base=0.01), retries)

        def make_cluster() -> RedisCluster:
            nodes = [urlsplit(one) for one in urls]
            return RedisCluster(
                host=nodes[0].hostname if len(nodes) == 1 else None,
                port=nodes[0].port or 6379,
                startup_nodes=(
                    [ClusterNode(node.hostname or "127.0.0.1", node.port or 6379) for node in nodes]
                    if len(nodes) > 1
                    else None
                ),
                password=nodes[0].password,
                username=nodes[0].username,
                ssl=nodes[0].scheme == "rediss",
                max_connections=max_connections,
                socket_timeout=socket_timeout,
                socket_connect_timeout=connect_timeout,
                retry=retry(),
                **redis_options,
            )

        def make_client() -> aioredis.Redis:
            pool = aioredis.BlockingConnectionPool.from_url(
                urls[0],
                max_connections=max_connections,
                timeout=pool_timeout,
                socket_timeout=socket_timeout,
                socket_connect_timeout=connect_timeout,
                retry=retry(),
                retry_on_error=[redis_errors.ConnectionError, redis_errors.TimeoutError],
                **redis_options,
            )
            return aioredis.Redis(connection_pool=pool)

        return cls(
            make_cluster if cluster else make_client,
            namespace=namespace,
            lease=lease,
            max_hold=max_hold,
            heartbeat=heartbeat,
            key_ttl=key_ttl,
            breaker_threshold=breaker_threshold,
            breaker_cooldown=breaker_cooldown,
            on_lease_lost=on_lease_lost,
        )

    def __repr__(self) -> str:
        return f"<RedisBackend namespace={self.namespace!r} lease={self.lease}>"

    def redis_keys(self, key: str) -> list[str]:
        """The Redis keys one lock key uses (holders, queue, waiter liveness, counters)."""
        base = f"{{{self.namespace}:{key}}}"
        return [base + ":o", base + ":q", base + ":w", base + ":m"]

    # -- the LockBackend protocol -----------------------------------------------------------

    async def acquire(
        self, key: str, *, timeout: float | None, max_concurrency: int, shared: bool = False
    ) -> RedisLease:
        """Take `key` in Redis, FIFO across processes and modes; see `LockBackend.acquire`."""
        return await self._acquire(key, timeout, max_concurrency, shared, None)

    async def acquire_after(
        self,
        lease: BackendLease,
        key: str,
        *,
        timeout: float | None,
        max_concurrency: int,
        shared: bool = False,
    ) -> RedisLease:
        """`acquire`, releasing `lease` (this process's hold on `key` that just ended) in the
        same ACQUIRE script; see `HandOverBackend.acquire_after`."""
        if not isinstance(lease, RedisLease) or lease._backend is not self or lease.key != key:
            await lease.release()  # not a lease this script can release: the plain way
            return await self._acquire(key, timeout, max_concurrency, shared, None)
        return await self._acquire(key, timeout, max_concurrency, shared, lease)

    async def _acquire(
        self,
        key: str,
        timeout: float | None,
        max_concurrency: int,
        shared: bool,
        previous: RedisLease | None,
    ) -> RedisLease:
        """`acquire`; `previous` (a lease of this process on `key`) is released by the first
        ACQUIRE, or, if the caller gives up before that one answered, by its give-up RELEASE."""
        keys = self.redis_keys(key)
        try:
            conn = await self._connection()
            if conn.shards is not None and timeout != 0 and not conn.shards.listening(keys[0]):
                await self._listen(conn, keys)
        except BaseException:
            if previous is not None:
                await previous.release()  # shielded
            raise
        passed = ""  # the previous lease's token until an ACQUIRE carrying it has answered
        if previous is not None:
            if previous._conn is conn:
                passed = previous._token_str if previous._let_go() else ""
            else:  # a connection of another loop or process: it cannot ride on this one
                await previous.release()
        loop = conn.loop
        # The mode travels in the token: the scripts read it from the `|s` suffix.
        token = f"{conn.proc_id}|{next(conn.counter)}{'|s' if shared else ''}"
        deadline = None if timeout is None else loop.time() + timeout
        may_wait = "0" if timeout == 0 else "1"
        args: list[Any] = [
            token,
            *self._acquire_ms,
            conn.prefix_for(keys),
            max_concurrency,
            may_wait,
            self._claim_arg,
            conn.publish,
            passed,
        ]
        waiters = conn.waiters
        valid_for = self.lease
        try:
            while True:
                future = loop.create_future()
                waiters[token] = future  # before the call: a wake-up can never come too early
                sent_at = monotonic()
                granted, fence, left_ms = await self._run(conn.acquire, keys, args, conn)
                passed = args[9] = ""  # released by that call
                if granted:
                    break
                if may_wait == "0":
                    raise LockBusy("the key is held in another process")
                # Grants issued before this call were seen by it ("already ours"); a message
                # for one that has ended since comes with a fence no larger than this.
                issued = int(fence)
                # Wake up before a claim handed to us could end unnoticed (lost message).
                pause = min(self.heartbeat, self._claim / 2)
                if left_ms >= 0:
                    pause = min(pause, left_ms / 1000 + 0.005)
                if deadline is not None:
                    left = deadline - loop.time()
                    if left <= 0:
                        raise LockTimeout(f"the key was not granted within {timeout} seconds")
                    pause = min(pause, left)
                timer = loop.call_later(pause, _resolve, future)
                try:
                    handed, claim_ms = await future
                finally:
                    timer.cancel()
                if handed > issued:  # handed the key by a RELEASE: a claim, begun after `sent_at`
                    fence, valid_for = handed, claim_ms / 1000
                    break
                # Otherwise ask again (a fallback, a hint, or a late message for a claim that
                # already ended, which would let two holders overlap).
        except BaseException:
            waiters.pop(token, None)
            await self._give_up(conn, keys, token, max_concurrency)
            if passed:  # the ACQUIRE carrying it may not have run
                await self._give_up(conn, keys, passed, max_concurrency)
            raise
        waiters.pop(token, None)
        return RedisLease(
            self, conn, key, keys, token, int(fence), max_concurrency, sent_at, valid_for
        )

    async def aclose(self) -> None:
        """Release this event loop's open leases, stop its reader, close its connections."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        conn = self._conns.pop(loop, None)
        if conn is None:
            return
        with anyio.CancelScope(shield=True):
            for lease in list(conn.leases):
                await lease.release()
            if conn.reader is not None:
                conn.reader.cancel()
                await asyncio.gather(conn.reader, return_exceptions=True)
            if conn.pubsub is not None:
                try:
                    await conn.pubsub.aclose()
                except Exception:  # pragma: no cover - closing a broken connection
                    logger.debug("closing the pub/sub connection failed", exc_info=True)
            if conn.shards is not None:
                await conn.shards.aclose()
            if conn.owns_client:
                try:
                    await conn.client.aclose()
                except Exception:  # pragma: no cover - closing a broken connection
                    logger.debug("closing the Redis client failed", exc_info=True)

    # -- internals --------------------------------------------------------------------------

    async def _connection(self) -> _Connection:
        """This loop's connection, subscribed to its wake-up channel before it is used."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(_TRIO_MESSAGE) from None
        conn = self._conns.get(loop)
        if conn is None or conn.pid != os.getpid():  # first use, or inherited through fork
            conn = self._conns[loop] = _Connection(self, loop)
        while True:
            ready = conn.ready
            if ready is not None and ready.done() and ready.exception() is None:
                return conn
            if ready is None or ready.done():
                ready = conn.ready = loop.create_future()
                try:
                    await self._subscribe(conn)
                except Exception as exc:
                    conn.ready = None  # later callers try again
                    ready.set_exception(exc)  # those waiting now fail as this caller did
                    ready.exception()  # retrieved, should nobody be waiting
                    raise
                except BaseException:
                    conn.ready = None  # this caller was cancelled, not those waiting:
                    ready.set_result(False)  # one of them subscribes instead
                    raise
                ready.set_result(True)
                return conn
            if await asyncio.shield(ready):
                return conn

    async def _subscribe(self, conn: _Connection) -> None:
        probe = self._breaker.enter()
        try:
            if isinstance(conn.client, RedisCluster):
                # Learn the slots; each slot's wake-up channel is subscribed on first wait.
                await conn.client.initialize()
                self._breaker.succeeded(probe)
                return
            if conn.pubsub is None:
                conn.pubsub = conn.client.pubsub()
            await conn.pubsub.subscribe(conn.channel)
            # Wait for the confirmation: from then on no wake-up for this process is lost.
            deadline = monotonic() + 5.0
            while True:
                message = await conn.pubsub.get_message(timeout=1.0)
                if message is not None and message["type"] == "subscribe":
                    break
                if monotonic() > deadline:
                    raise redis_errors.TimeoutError("no confirmation of SUBSCRIBE")
        except _CONNECTIVITY_ERRORS as exc:
            self._breaker.failed(probe)
            if conn.pubsub is not None:
                pubsub, conn.pubsub = conn.pubsub, None
                with anyio.CancelScope(shield=True):
                    try:
                        await pubsub.aclose()
                    except Exception:
                        logger.debug("closing a failed pub/sub connection", exc_info=True)
            raise self._error(exc) from exc
        except BaseException:
            self._breaker.abandoned(probe)
            raise
        self._breaker.succeeded(probe)
        conn.reader = conn.loop.create_task(self._read(conn))

    async def _read(self, conn: _Connection) -> None:
        """Resolve parked waiters from the process's wake-up channel; survive reconnects."""
        pubsub = conn.pubsub
        pause = 0.05
        broken = False
        while True:
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=10.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                if not broken:
                    logger.warning("Redis wake-up channel lost; reconnecting", exc_info=True)
                broken = True
                conn.wake_all()  # messages may be lost: everyone asks Redis again
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)
                continue
            if broken:
                broken = False
                pause = 0.05
                logger.info("Redis wake-up channel back")
                conn.wake_all()
            if message is not None and message["type"] == "message":
                data = message["data"]
                conn.wake(data.decode() if isinstance(data, bytes) else str(data))

    async def _run(self, script: Any, keys: list[str], args: list[Any], conn: _Connection) -> Any:
        """Run one script through the circuit breaker; Redis errors become BackendUnavailable."""
        breaker = conn.breaker_for(keys)
        probe = breaker.enter()
        try:
            try:  # EVALSHA itself: redis-py's Script call adds an import and two wrappers
                result = await conn.client.execute_command(
                    "EVALSHA", script.sha, len(keys), *keys, *args
                )
            except redis_errors.NoScriptError:  # a restarted or flushed server: load it again
                result = await script(keys=keys, args=args, client=conn.client)
        except _POOL_FULL as exc:
            breaker.abandoned(probe)
            raise self._error(exc, breaker) from exc
        except _CONNECTIVITY_ERRORS as exc:
            breaker.failed(probe)
            raise self._error(exc, breaker) from exc
        except redis_errors.RedisError as exc:
            # On a cluster, a shard that is down shows as CLUSTERDOWN / no node for the slot.
            if isinstance(exc, _CLUSTER_DOWN):
                breaker.failed(probe)
            else:
                breaker.abandoned(probe)
            raise self._error(exc, breaker) from exc
        except BaseException:
            breaker.abandoned(probe)
            raise
        breaker.succeeded(probe)
        if type(result) is int:
            return result
        # ACQUIRE: "<granted> <fence> <ms left>", one string (cheaper to read than an array)
        granted, fence, left = result.split()
        return int(granted), int(fence), int(left)

    async def _listen(self, conn: _Connection, keys: list[str]) -> None:
        """On a cluster: be subscribed to this process's channel in the keys' slot."""
        assert conn.shards is not None
        breaker = conn.breaker_for(keys)
        probe = breaker.enter()
        try:
            await conn.shards.listen(keys[0])
        except _CONNECTIVITY_ERRORS + _CLUSTER_DOWN as exc:
            breaker.failed(probe)
            raise self._error(exc, breaker) from exc
        except redis_errors.RedisError as exc:
            breaker.abandoned(probe)
            raise self._error(exc, breaker) from exc
        except BaseException:
            breaker.abandoned(probe)
            raise
        breaker.succeeded(probe)

    def _error(self, exc: BaseException, breaker: _Breaker | None = None) -> BackendUnavailable:
        return _unavailable(
            f"the lock service is unavailable ({type(exc).__name__})",
            (breaker or self._breaker).retry_after(),
        )

    def _release_args(
        self, token: str, conn: _Connection, slots: int, keys: list[str]
    ) -> list[Any]:
        prefix = conn.prefix_for(keys)
        return [token, prefix, slots, self._claim_ms, self._meta_ttl_ms, conn.publish]

    async def _give_up(self, conn: _Connection, keys: list[str], token: str, slots: int) -> None:
        """Leave the queue, or pass on a grant this caller will not use (a reply that was lost,
        a hand-off that came as it timed out or was cancelled); shielded, best effort.

        If Redis cannot be reached, whatever this caller left there expires on its own: a
        queue entry within `3 * heartbeat + 0.5` s, a hand-off within its claim, a grant
        within `lease`.
        """
        if conn.breaker_for(keys).is_open():
            return
        with anyio.CancelScope(shield=True):
            try:
                args = self._release_args(token, conn, slots, keys)
                await self._run(conn.release, keys, args, conn)
            except BackendUnavailable:
                logger.warning("could not leave the Redis queue; the entry expires by itself")
