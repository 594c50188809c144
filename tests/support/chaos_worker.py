"""A lock-holding process for the chaos tests: `python -m tests.support.chaos_worker CONFIG`.

CONFIG is JSON: engine ("redis" | "postgres"), url, namespace, lease, db (the resource's
SQLite file), who, and mode:

- "hold": take `key`, say `{"event": "granted", ...}` on stdout, then obey stdin lines:
  `write` (a fenced write, answered `{"event": "wrote", "accepted": ...}`) and `release`.
  The test pauses, resumes and cuts this process off between commands.
- "traffic": take each of `keys` in turn `rounds` times, one fenced write per hold; an engine
  that cannot be reached (`BackendUnavailable`) is noted and retried. Says `held` after each
  hold and `done` at the end.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import anyio
import anyio.to_thread

from keyedlock_asgi import BackendUnavailable, KeyedLock, LockTimeout
from keyedlock_asgi.backends import LeaseLost
from tests.support.chaos_resource import Resource


def say(**event: Any) -> None:
    print(json.dumps({"t": time.monotonic(), **event}), flush=True)


def backend(config: dict[str, Any], on_lease_lost: Any) -> Any:
    lease = float(config["lease"])
    if config["engine"] == "redis":
        from keyedlock_asgi.backends.redis import RedisBackend

        return RedisBackend.from_url(
            config["url"],
            namespace=config["namespace"],
            lease=lease,
            heartbeat=0.2,
            breaker_cooldown=0.2,
            on_lease_lost=on_lease_lost,
            client_name=config["who"],
        )
    from keyedlock_asgi.backends.postgres import PostgresBackend

    return PostgresBackend.from_dsn(
        config["url"],
        namespace=config["namespace"],
        lease=lease,
        heartbeat=lease / 4,
        on_lease_lost=on_lease_lost,
    )


async def hold(config: dict[str, Any], lock: KeyedLock, resource: Resource) -> None:
    who, key = config["who"], config["key"]
    async with lock.hold(key) as held:
        token = held.token
        resource.record(who, key, "enter", token)
        say(event="granted", token=token)
        while True:
            command = (await anyio.to_thread.run_sync(sys.stdin.readline)).strip()
            if command == "write":
                say(event="wrote", accepted=resource.write(who, key, token))
            elif command == "release" or not command:
                break
        resource.record(who, key, "exit", token)
    say(event="released")


async def traffic(config: dict[str, Any], lock: KeyedLock, resource: Resource) -> None:
    who = config["who"]
    for round_ in range(int(config["rounds"])):
        for key in config["keys"]:
            while True:
                try:
                    async with lock.hold(key, timeout=10) as held:
                        resource.record(who, key, "enter", held.token)
                        resource.write(who, key, held.token)
                        await anyio.sleep(0.005)  # stay inside a moment: let others try
                        resource.record(who, key, "exit", held.token)
                    break
                except (BackendUnavailable, LockTimeout) as exc:
                    resource.record(who, key, f"note:{type(exc).__name__}")
                    await anyio.sleep(0.05)
            say(event="held", round=round_, key=key)
    say(event="done")


async def main() -> None:
    config = json.loads(sys.argv[1])
    resource = Resource(config["db"])
    who = config["who"]

    def lost(event: LeaseLost) -> None:
        resource.record(who, config.get("key", event.key), "lost", event.token)
        say(event="lost", reason=event.reason, token=event.token)

    lock = KeyedLock(backend=backend(config, lost))
    try:
        say(event="ready")
        await (hold if config["mode"] == "hold" else traffic)(config, lock, resource)
    finally:
        with anyio.move_on_after(10, shield=True):
            await lock.aclose()
        resource.close()


if __name__ == "__main__":
    anyio.run(main)
