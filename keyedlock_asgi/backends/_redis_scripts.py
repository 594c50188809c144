"""The Lua scripts behind `RedisBackend`: one atomic step each, all keyed by one hash tag.

Per lock key the scripts use four Redis keys sharing the hash tag `{<namespace>:<key>}` (so they
live in one Cluster slot), and every one of them expires:

- `:o`  ZSET  holder token -> lease end (ms, server clock). Up to `max_concurrency` members.
- `:q`  ZSET  waiter token -> ticket (FIFO order).
- `:w`  ZSET  waiter token -> liveness deadline (ms, server clock); refreshed by each retry.
- `:m`  HASH  `fence` (last fencing token), `seq` (last ticket), and each holder's own fence.

Tokens are `"<process id>|<n>"`; a script wakes a waiter by publishing its token on the channel
`<channel prefix><process id>`, which only that process listens to. Time always comes from the
server (`TIME`), never from the clients, whose clocks may disagree.
"""

from __future__ import annotations

__all__ = ["ACQUIRE", "EXTEND", "RELEASE"]

_PRELUDE = """
local own, queue, alive, meta = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

-- Holders whose lease ended and waiters that stopped retrying never block the key for good.
local function prune()
  local gone = redis.call('ZRANGEBYSCORE', own, '-inf', now, 'LIMIT', 0, 64)
  if #gone > 0 then
    redis.call('ZREM', own, unpack(gone))
    redis.call('HDEL', meta, unpack(gone))
  end
  gone = redis.call('ZRANGEBYSCORE', alive, '-inf', now, 'LIMIT', 0, 64)
  if #gone > 0 then
    redis.call('ZREM', queue, unpack(gone))
    redis.call('ZREM', alive, unpack(gone))
  end
end

-- Tell the first `count` waiters (each in its own process) that a slot may be free.
local function wake(prefix, count)
  if count <= 0 then return end
  local heads = redis.call('ZRANGE', queue, 0, count - 1)
  for _, head in ipairs(heads) do
    local proc = string.match(head, '^([^|]+)|')
    if proc then redis.call('PUBLISH', prefix .. proc, head) end
  end
end

-- The holders' key lives as long as its longest lease.
local function keep(ms)
  if redis.call('PTTL', own) < ms then redis.call('PEXPIRE', own, ms) end
end
"""

ACQUIRE = (
    _PRELUDE
    + """
-- ARGV: token, lease ms, waiter ttl ms, meta ttl ms, channel prefix, max holders, may wait
local token = ARGV[1]
local lease = tonumber(ARGV[2])
local waiter_ttl = tonumber(ARGV[3])
local meta_ttl = tonumber(ARGV[4])
local prefix = ARGV[5]
local slots = tonumber(ARGV[6])
local may_wait = ARGV[7] == '1'
prune()

-- Already ours (a retried call whose first reply was lost): same grant, same fence.
if redis.call('ZSCORE', own, token) then
  redis.call('ZADD', own, now + lease, token)
  keep(lease)
  return {1, redis.call('HGET', meta, token) or '0', 0}
end

local free = slots - redis.call('ZCARD', own)
if free > 0 then
  local rank = redis.call('ZRANK', queue, token)
  if not rank then rank = redis.call('ZCARD', queue) end
  if rank < free then
    redis.call('ZADD', own, now + lease, token)
    redis.call('ZREM', queue, token)
    redis.call('ZREM', alive, token)
    -- Strictly increasing, and never below the server time in microseconds: the fence keeps
    -- rising even if Redis lost this key (restart without persistence, expiry).
    local last = tonumber(redis.call('HGET', meta, 'fence') or '0')
    local floor = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
    local fence = string.format('%.0f', math.max(last + 1, floor))
    redis.call('HSET', meta, 'fence', fence, token, fence)
    redis.call('PEXPIRE', meta, meta_ttl)
    keep(lease)
    wake(prefix, free - 1)
    return {1, fence, 0}
  end
  wake(prefix, free)
end

if may_wait then
  if not redis.call('ZSCORE', queue, token) then
    redis.call('ZADD', queue, redis.call('HINCRBY', meta, 'seq', 1), token)
    redis.call('PEXPIRE', meta, meta_ttl)
  end
  redis.call('ZADD', alive, now + waiter_ttl, token)
  redis.call('PEXPIRE', queue, 2 * waiter_ttl)
  redis.call('PEXPIRE', alive, 2 * waiter_ttl)
end

-- How long until the first lease ends (-1: no holder, a free slot is being handed on).
local first = redis.call('ZRANGE', own, 0, 0, 'WITHSCORES')
local left = -1
if first[2] then left = tonumber(first[2]) - now end
return {0, '0', left}
"""
)

RELEASE = (
    _PRELUDE
    + """
-- ARGV: token, channel prefix, max holders. Also how a waiter that gives up leaves the queue.
local token = ARGV[1]
local released = redis.call('ZREM', own, token)
if released == 1 then
  redis.call('HDEL', meta, token)
else
  redis.call('ZREM', queue, token)
  redis.call('ZREM', alive, token)
end
prune()
wake(ARGV[2], tonumber(ARGV[3]) - redis.call('ZCARD', own))
return released
"""
)

EXTEND = (
    _PRELUDE
    + """
-- ARGV: token, new lease ms, meta ttl ms. 0: the lease already ended (someone may hold it now).
local token = ARGV[1]
local ms = tonumber(ARGV[2])
local ends = redis.call('ZSCORE', own, token)
if not ends or tonumber(ends) <= now then return 0 end
redis.call('ZADD', own, now + ms, token)
keep(ms)
redis.call('PEXPIRE', meta, tonumber(ARGV[3]))
return 1
"""
)
