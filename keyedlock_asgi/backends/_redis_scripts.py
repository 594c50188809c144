"""The Lua scripts behind `RedisBackend`: one atomic step each, all keyed by one hash tag.

Per lock key the scripts use four Redis keys sharing the hash tag `{<namespace>:<key>}` (so they
live in one Cluster slot), and every one of them expires:

- `:o`  ZSET  holder token -> lease end (ms, server clock). Up to `max_concurrency` members;
  expires a minute after the last lease ends.
- `:q`  ZSET  waiter token -> ticket (FIFO order).
- `:w`  ZSET  waiter token -> liveness deadline (ms, server clock); refreshed by each retry.
- `:m`  HASH  `fence` (last fencing token), `seq` (last ticket), and each holder's own fence.

Shared holds: a token ending in `|s` is a reader's. Holders are never mixed (all shared, or up
to `max_concurrency` exclusive), so the first holder tells the mode of them all. Grants follow
the queue: the head is granted when it fits beside the holders, and so is the next one, until
one does not fit; a shared head therefore takes every shared waiter directly behind it along,
up to the next exclusive waiter, and a newcomer never overtakes a non-empty queue.

Hand-off is direct: when a slot frees (RELEASE, or any script that prunes an ended lease), the
script itself makes the live waiter at the head of the queue a holder, with a short *claim*
lease, and publishes `"<token> <fence> <claim ms>"` on the channel `<channel prefix><process id>`,
which only that waiter's process listens to (tokens are `"<process id>|<n>"`, plus `|s` when
shared). The publishing command is an argument: PUBLISH, or SPUBLISH on Redis Cluster, where
the channel prefix carries a hash tag of the lock key's slot (a script stays in one slot). The
waiter then holds the key without another round trip and renews the claim to a full lease.
Whatever happens to the message, the grant stands: the waiter's next ACQUIRE finds "already
ours", its RELEASE (on timeout or cancellation) passes the key on, and if its process died the
claim simply ends.
In-process hand-off: when a hold ends and the key goes to the next caller of the same process,
that caller's ACQUIRE carries the ended hold's token and releases it first, then goes on as any
ACQUIRE (hand on to the waiters queued here, else take the key): one script, not RELEASE then
ACQUIRE, and the same order across processes.
Time always comes from the server (`TIME`), never from the clients, whose clocks may disagree.
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

-- The holders' key outlives its longest lease by a minute, so that an ended lease whose holder
-- never released it (a crash) is still there for `prune` to find, and its fence in `meta` goes
-- with it; had `own` expired with the lease, that field would stay as long as the key is used.
local function keep(ms)
  ms = ms + 60000
  if redis.call('PTTL', own) < ms then redis.call('PEXPIRE', own, ms) end
end

-- Make `token` a holder until `now + ms`, with the next fencing token. Strictly increasing, and
-- never below the server time in microseconds: the fence keeps rising even if Redis lost this
-- key (restart without persistence, expiry).
local function grant(token, ms, meta_ttl)
  redis.call('ZADD', own, now + ms, token)
  redis.call('ZREM', queue, token)
  redis.call('ZREM', alive, token)
  local last = tonumber(redis.call('HGET', meta, 'fence') or '0')
  local floor = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
  local fence = string.format('%.0f', math.max(last + 1, floor))
  redis.call('HSET', meta, 'fence', fence, token, fence)
  redis.call('PEXPIRE', meta, meta_ttl)
  keep(ms)
  return fence
end

local function is_shared(token)
  return string.sub(token, -2) == '|s'
end

-- Whether `token` may hold the key beside the current holders: shared ones only beside shared
-- ones (any number), exclusive ones only beside exclusive ones, up to `slots` of them.
local function fits(token, slots)
  local first = redis.call('ZRANGE', own, 0, 0)[1]
  if not first then return true end
  if is_shared(token) then return is_shared(first) end
  return not is_shared(first) and redis.call('ZCARD', own) < slots
end

-- Direct hand-off: grant the live waiters at the head of the queue, in order, while each fits
-- beside the holders (so a shared head takes the shared run behind it along), each with a
-- short claim lease (the waiter renews it to a full lease), and tell each waiter's process
-- ("<token> <fence> <claim ms>" on its channel, by `publish`) so that it holds the key without
-- asking again. A waiter whose process died holds it only until the claim ends; a lost message
-- is found by the waiter's next ACQUIRE ("already ours"). `quiet` (the script's caller) is not
-- told.
local function hand_on(slots, claim, meta_ttl, prefix, publish, quiet)
  while true do
    local head = redis.call('ZRANGE', queue, 0, 0)[1]
    if not head then return end
    local until_ms = tonumber(redis.call('ZSCORE', alive, head) or '0')
    if until_ms <= now then
      redis.call('ZREM', queue, head)
      redis.call('ZREM', alive, head)
    elseif not fits(head, slots) then
      return
    else
      local fence = grant(head, claim, meta_ttl)
      local proc = string.match(head, '^([^|]+)|')
      if proc and head ~= quiet then
        redis.call(publish, prefix .. proc, head .. ' ' .. fence .. ' ' .. claim)
      end
    end
  end
end
"""

ACQUIRE = (
    _PRELUDE
    + """
-- ARGV: token, lease ms, waiter ttl ms, meta ttl ms, channel prefix, max holders, may wait,
-- claim ms, publish command, and optionally the token of this process's hold that just ended
-- on this key (passed on in-process to this caller): released first, so the waiters queued
-- here go before this caller, as after a RELEASE.
local token = ARGV[1]
local lease = tonumber(ARGV[2])
local waiter_ttl = tonumber(ARGV[3])
local meta_ttl = tonumber(ARGV[4])
local prefix = ARGV[5]
local slots = tonumber(ARGV[6])
local may_wait = ARGV[7] == '1'
local claim = tonumber(ARGV[8])
local previous = ARGV[10]
if previous and previous ~= '' and redis.call('ZREM', own, previous) == 1 then
  redis.call('HDEL', meta, previous)
end
prune()
-- No holder left: a holder's fence still in `meta` is from a hold that ended without RELEASE
-- after `own` had expired (its process died, and no call came within the minute): drop it.
if redis.call('ZCARD', own) == 0 and redis.call('HLEN', meta) > 1 then
  for _, field in ipairs(redis.call('HKEYS', meta)) do
    if field ~= 'fence' and field ~= 'seq' then redis.call('HDEL', meta, field) end
  end
end
hand_on(slots, claim, meta_ttl, prefix, ARGV[9], token)

-- Already ours (handed on to us, or a retried call whose first reply was lost): same grant,
-- same fence, now with a full lease.
if redis.call('ZSCORE', own, token) then
  redis.call('ZADD', own, now + lease, token)
  keep(lease)
  return '1 ' .. (redis.call('HGET', meta, token) or '0') .. ' 0'
end

-- After hand_on, a non-empty queue has a head that does not fit: never overtake it.
if redis.call('ZCARD', queue) == 0 and fits(token, slots) then
  return '1 ' .. grant(token, lease, meta_ttl) .. ' 0'
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

-- How long until the first lease ends, and the last fence issued: any hand-off this caller
-- gets later carries a larger one (a message for an older grant is stale and ignored).
local first = redis.call('ZRANGE', own, 0, 0, 'WITHSCORES')
local left = -1
if first[2] then left = tonumber(first[2]) - now end
return '0 ' .. (redis.call('HGET', meta, 'fence') or '0') .. ' ' .. string.format('%d', left)
"""
)

RELEASE = (
    _PRELUDE
    + """
-- ARGV: token, channel prefix, max holders, claim ms, meta ttl ms, publish command. Also how a
-- waiter that gives up leaves the queue, and how one that was handed the key (maybe unknowingly)
-- passes it on.
local token = ARGV[1]
local released = redis.call('ZREM', own, token)
if released == 1 then
  redis.call('HDEL', meta, token)
else
  redis.call('ZREM', queue, token)
  redis.call('ZREM', alive, token)
end
prune()
hand_on(tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[2], ARGV[6], '')
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
