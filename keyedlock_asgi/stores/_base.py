"""What an idempotency store keeps, and the protocol every store implements."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["IdempotencyStore", "StoredResponse", "decode", "encode"]


@dataclass(frozen=True)
class StoredResponse:
    """The completed first response for a key, with the fingerprint of its request."""

    fingerprint: str
    """Hex SHA-256 of the request's method, path, query and body hash."""
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes | None
    """None when the response was not kept (too large, or not capturable): duplicates get 409."""

    @property
    def size(self) -> int:
        """Bytes of memory this entry roughly costs (body and headers)."""
        return len(self.body or b"") + sum(len(k) + len(v) for k, v in self.headers)


@runtime_checkable
class IdempotencyStore(Protocol):
    """Where completed responses live between a request and its retries.

    The middleware calls `get` and `put` only while it holds the key's lock, so a store needs no
    locking of its own; `put` keeps the first entry if one is already there.
    """

    async def get(self, key: str) -> StoredResponse | None:
        """The entry for `key`, or None if there is none or it expired."""
        ...

    async def put(self, key: str, response: StoredResponse, ttl: float) -> None:
        """Keep `response` for `ttl` seconds (the engine expires it; nobody must sweep)."""
        ...

    async def aclose(self) -> None:
        """Close connections."""
        ...


def encode(response: StoredResponse) -> bytes:
    """One blob: a JSON line (bytes as Latin-1, which maps each byte to one character), then
    the body as is."""
    head = {
        "f": response.fingerprint,
        "s": response.status,
        "h": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in response.headers],
        "k": response.body is not None,
    }
    return json.dumps(head, separators=(",", ":")).encode("ascii") + b"\n" + (response.body or b"")


def decode(blob: bytes) -> StoredResponse:
    line, _, body = blob.partition(b"\n")
    head = json.loads(line)
    return StoredResponse(
        fingerprint=head["f"],
        status=int(head["s"]),
        headers=tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in head["h"]),
        body=body if head["k"] else None,
    )
