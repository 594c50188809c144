"""Your exception handler renders per-route rejections (docs/per-route.md)."""

from __future__ import annotations

# --8<-- [start:handler]
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from keyedlock_asgi import KeyedLock, KeyedLockError, keys

lock = KeyedLock(timeout=0)
app = FastAPI()


@app.exception_handler(HTTPException)
async def problem_json(request: Request, exc: HTTPException) -> JSONResponse:
    body = {"title": exc.detail, "status": exc.status_code}
    if isinstance(exc.__cause__, KeyedLockError):  # a lock said no: busy, timeout, ...
        body["type"] = "/problems/request-in-progress"
    return JSONResponse(
        body,
        status_code=exc.status_code,
        headers=exc.headers,
        media_type="application/problem+json",
    )


@app.post("/transfers", dependencies=[lock.depends(keys.header("X-Account"))])
async def transfer() -> dict[str, str]:
    return {"status": "done"}


# --8<-- [end:handler]
