"""Quota leases on a single Redis server (:mod:`sealserve.defense.lease`): one Lua
script takes a lease, one returns it, one voids the leases of reset windows.

Same arithmetic as :meth:`TransactionalStore.lease`: a lease admits the request and
counts ``take`` units in every window in one script; its spare part is recorded in a
hash (``u``: units, ``k``: the window keys) that the return script deletes in the same
step as it subtracts, so a lease is returned at most once. Each window key keeps a set
of the leases recorded on it (``<window key>:leases``) so a reset voids them. The
scripts touch keys they compute, so they run on a single Redis only; on a cluster
every admit stays per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from sealserve.defense.store.base import (
    LEASE_FRACTION,
    STATE_SLACK_S,
    AdmitResult,
    Check,
    Lease,
    LeaseAsk,
    lease_answer,
    lease_slots,
    with_deadline,
)

if TYPE_CHECKING:
    from sealserve.defense.store.redis import RedisStore

# KEYS: the n window keys, the account's status key, the lease record key.
# ARGV: now cost want fraction n record_ttl_ms, then per window "limit ttl_ms".
# Returns {3} (status not normal), {0, level_1..n} (refused) or {1, take, level_1..n}.
LEASE_LUA = """
local a = {}
for w in string.gmatch(ARGV[1], '%S+') do a[#a + 1] = w end
local now, cost, want = tonumber(a[1]), tonumber(a[2]), tonumber(a[3])
local frac, n, rttl = tonumber(a[4]), tonumber(a[5]), tonumber(a[6])
local st = redis.call('HMGET', KEYS[n + 1], 'kind', 'expires')
if st[1] and st[1] ~= 'normal' and (st[2] == '' or now < tonumber(st[2])) then
  return {3}
end
local levels, left = {}, nil
for i = 1, n do
  local c = tonumber(redis.call('GET', KEYS[i]) or '0')
  levels[i] = c
  local l = tonumber(a[5 + 2 * i]) - c
  if left == nil or l < left then left = l end
end
if left < cost then
  local out = {0}
  for i = 1, n do out[#out + 1] = levels[i] end
  return out
end
local take = math.min(want, math.floor(left * frac))
if take < cost then take = cost end
for i = 1, n do
  redis.call('INCRBY', KEYS[i], take)
  redis.call('PEXPIRE', KEYS[i], tonumber(a[6 + 2 * i]))
end
if take > cost then
  local rec = KEYS[n + 2]
  redis.call('HSET', rec, 'u', take - cost, 'k', table.concat(KEYS, ' ', 1, n))
  redis.call('PEXPIRE', rec, rttl)
  for i = 1, n do
    redis.call('SADD', KEYS[i] .. ':leases', rec)
    redis.call('PEXPIRE', KEYS[i] .. ':leases', tonumber(a[6 + 2 * i]))
  end
end
local out = {1, take}
for i = 1, n do out[#out + 1] = levels[i] end
return out
"""

# KEYS[1]: the lease record. ARGV[1]: unused units. Deletes the record and subtracts
# min(unused, its units) from each of its windows (never below zero, TTL kept).
RETURN_LUA = """
local rec = redis.call('HMGET', KEYS[1], 'u', 'k')
if not rec[1] then return 0 end
redis.call('DEL', KEYS[1])
local give = math.min(tonumber(ARGV[1]), tonumber(rec[1]))
if give <= 0 then return 0 end
for key in string.gmatch(rec[2], '%S+') do
  redis.call('SREM', key .. ':leases', KEYS[1])
  local c = tonumber(redis.call('GET', key) or 'nil')
  if c then
    local v = c - give
    if v < 0 then v = 0 end
    redis.call('SET', key, v, 'KEEPTTL')
  end
end
return give
"""

# KEYS: window keys being reset. Deletes every lease recorded on them.
VOID_LUA = """
for i = 1, #KEYS do
  local idx = KEYS[i] .. ':leases'
  for _, rec in ipairs(redis.call('SMEMBERS', idx)) do redis.call('DEL', rec) end
  redis.call('DEL', idx)
end
return 0
"""


def take_lease(
    store: RedisStore, checks: Sequence[Check], ask: LeaseAsk
) -> tuple[AdmitResult | None, Lease | None]:
    """:meth:`StateStore.lease` for :class:`RedisStore`: one script on a single Redis;
    on a cluster, the request is admitted per call and nothing is leased."""
    if not store.leases:
        return store.admit(checks, cost=ask.cost, now=ask.now, account=ask.account), None
    keys, argv, answer = _plan(store, checks, ask)
    return answer(store._call(lambda: store._lease_scripts()["lease"](keys=keys, args=argv)))


async def take_lease_async(
    store: RedisStore, checks: Sequence[Check], ask: LeaseAsk, *, deadline_s: float
) -> tuple[AdmitResult | None, Lease | None]:
    """:func:`take_lease` on redis-py's asyncio client, within ``deadline_s``."""
    got = await store._async_client()
    if got is None or not store.leases:
        call = partial(take_lease, store, checks, ask)
        return await store.call_async(call, deadline_s=deadline_s)
    keys, argv, answer = _plan(store, checks, ask)
    script = got[1]["lease"]
    return answer(await with_deadline(store._acall(script(keys=keys, args=argv)), deadline_s))


def _plan(
    store: RedisStore, checks: Sequence[Check], ask: LeaseAsk
) -> tuple[list[str], list[str], Callable[[list[Any]], tuple[AdmitResult | None, Lease | None]]]:
    """The lease script's keys and arguments, and how to read its answer."""
    cost, now = ask.cost, ask.now
    slots = lease_slots(checks, cost=cost, now=now)
    ends = [end for _, end in slots]
    keys = [store._k(c.group, k) for c, (k, _) in zip(checks, slots, strict=True)]
    keys += [store._status_key(ask.account), lease_key(store, ask.lease_id)]
    expires = min(now + ask.lease_s, *ends)
    slack_ms = int(STATE_SLACK_S * 1000)
    argv = [f"{now!r} {cost} {ask.want} {LEASE_FRACTION!r} {len(checks)} "
            f"{math.ceil((expires - now) * 1000) + slack_ms}"]  # fmt: skip
    argv[0] += "".join(
        f" {c.limit} {math.ceil((end - now) * 1000) + slack_ms}"
        for c, end in zip(checks, ends, strict=True)
    )

    def answer(out: list[Any]) -> tuple[AdmitResult | None, Lease | None]:
        if int(out[0]) == 3:
            return None, None
        take = int(out[1]) if int(out[0]) == 1 else 0
        levels = [float(v) for v in out[2:]] if take else [float(v) for v in out[1:]]
        return lease_answer(checks, ends, levels, ask, take=take, expires=expires)

    return keys, argv, answer


def give_back(store: RedisStore, lease_id: str, unused: int) -> None:
    """:meth:`StateStore.return_lease` on a single Redis."""
    key = lease_key(store, lease_id)
    store._call(lambda: store._lease_scripts()["return"](keys=[key], args=[max(0, unused)]))


def void(store: RedisStore, keys: Sequence[str]) -> None:
    """Delete every lease recorded on the window ``keys`` (a reset)."""
    if keys:
        store._call(lambda: store._lease_scripts()["void"](keys=list(keys)))


def lease_key(store: RedisStore, lease_id: str) -> str:
    return store._k("leases", lease_id)
