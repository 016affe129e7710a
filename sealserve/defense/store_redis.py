"""Redis state store, for several replicas sharing limits.

Every admit is one round trip: one Lua script, registered once and called with EVALSHA
(redis-py loads it again if the server lost it), which reads every bucket and window,
the account's throttle factor, decides, and writes only if everything fits. Redis runs a
script atomically, so admits are exact under any concurrency.

Clock: the script uses the ``now`` the caller passes, never Redis ``TIME``, so the three
backends give identical answers and tests can inject time. Replicas must therefore run
NTP; a replica whose clock lags can neither refill a bucket backwards nor reopen a window
that another replica has moved past. Key TTLs (``PEXPIRE``, on Redis' own clock) only
reclaim memory: each lasts until the state stops mattering plus an hour of slack.

Keys live under ``<prefix>:`` and are not hash-tagged: use a single Redis (with a replica
for failover), not Redis Cluster.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis

from sealserve.defense.limits import window_bounds
from sealserve.defense.store import (
    HISTORY_LIMIT,
    STATE_SLACK_S,
    AccountStatus,
    AdmitResult,
    Check,
    Remaining,
    StateStore,
    StatusKind,
    finish,
    peek,
    validate_admit,
)
from sealserve.errors import UnavailableError

T = TypeVar("T")

# KEYS: one state key per check, then one status key per throttled account.
# ARGV: now, cost, n, dry, slack_ms, then per check: kind ('b'|'w'), limit, rate,
#       window ttl in ms, index of its status key among the status keys (0: none).
# Buckets admit with a shortfall of up to 0.001 token (store.TOKEN_EPS).
# Returns: {admitted, level_1, rate_1, ..., level_n, rate_n}; numbers as %.17g strings
# because Redis would truncate Lua numbers to integers. The arithmetic mirrors
# sealserve.defense.store.bucket_level and TransactionalStore.admit exactly.
ADMIT_LUA = """
local now = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local dry = ARGV[4] == '1'
local slack_ms = tonumber(ARGV[5])
local levels, rates, olds, factors = {}, {}, {}, {}
local ok = true
for i = 1, n do
  local base = 5 + (i - 1) * 5
  local kind = ARGV[base + 1]
  local limit = tonumber(ARGV[base + 2])
  local rate = tonumber(ARGV[base + 3])
  local sidx = tonumber(ARGV[base + 5])
  if kind == 'b' then
    if sidx > 0 then
      local f = factors[sidx]
      if f == nil then
        f = 1
        local st = redis.call('HMGET', KEYS[n + sidx], 'kind', 'factor', 'expires')
        if st[1] == 'throttled' and (st[3] == '' or now < tonumber(st[3])) then
          f = tonumber(st[2])
        end
        factors[sidx] = f
      end
      if f ~= 1 then rate = rate * f end
    end
    local b = redis.call('HMGET', KEYS[i], 't', 'ts')
    local level = limit
    if b[1] then
      local ts = tonumber(b[2])
      local elapsed = now - ts
      if elapsed < 0 then elapsed = 0 end
      level = tonumber(b[1]) + elapsed * rate
      if level > limit then level = limit end
      olds[i] = ts
    end
    if level + 0.001 < cost then ok = false end
    levels[i] = level
  else
    local c = tonumber(redis.call('GET', KEYS[i]) or '0')
    if c + cost > limit then ok = false end
    levels[i] = c
  end
  rates[i] = rate
end
if ok and not dry then
  for i = 1, n do
    local base = 5 + (i - 1) * 5
    local limit = tonumber(ARGV[base + 2])
    if ARGV[base + 1] == 'b' then
      local tokens = levels[i] - cost
      local ts = now
      if olds[i] and olds[i] > now then ts = olds[i] end
      redis.call('HSET', KEYS[i], 't', string.format('%.17g', tokens),
                 'ts', string.format('%.17g', ts))
      redis.call('PEXPIRE', KEYS[i], math.ceil((limit - tokens) / rates[i] * 1000) + slack_ms)
    else
      redis.call('INCRBY', KEYS[i], cost)
      redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[base + 4]))
    end
  end
end
local out = {ok and 1 or 0}
for i = 1, n do
  out[#out + 1] = string.format('%.17g', levels[i])
  out[#out + 1] = string.format('%.17g', rates[i])
end
return out
"""


class RedisStore(StateStore):
    """State in a Redis server shared by every replica.

    Raises UnavailableError("state store unreachable: ...") whenever Redis cannot be
    reached or answers with an error; it never admits without an answer.
    """

    def __init__(self, client: redis.Redis, *, prefix: str = "sealserve") -> None:
        if not prefix or any(c.isspace() for c in prefix):
            raise ValueError("prefix must be a non-empty string without spaces")
        self._r = client
        self.prefix = prefix
        self._admit_script = client.register_script(ADMIT_LUA)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "sealserve", timeout_s: float = 1.0) -> RedisStore:
        """Connect to ``redis://host:port/db`` with bounded connect and read timeouts."""
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=30,
        )
        return cls(client, prefix=prefix)

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except redis.RedisError as exc:
            raise UnavailableError(f"state store unreachable: redis: {exc}") from exc

    def _run(
        self, checks: Sequence[Check], *, cost: int, now: float, dry: bool
    ) -> tuple[bool, list[float], list[float]]:
        keys = [self._k(c.storage_key(now)) for c in checks]
        accounts: list[str] = []
        args: list[Any] = [
            repr(now),
            cost,
            len(checks),
            "1" if dry else "0",
            int(STATE_SLACK_S * 1000),
        ]
        for c in checks:
            sidx = 0
            if c.period is None and c.throttle_account is not None:
                if c.throttle_account not in accounts:
                    accounts.append(c.throttle_account)
                sidx = accounts.index(c.throttle_account) + 1
            ttl_ms = 0
            if c.period is not None:
                ttl_ms = math.ceil((window_bounds(c.period, now)[1] - now + STATE_SLACK_S) * 1000)
            args += ["b" if c.period is None else "w", c.limit, repr(float(c.rate)), ttl_ms, sidx]
        keys += [self._k("s", a) for a in accounts]
        out = self._call(lambda: self._admit_script(keys=keys, args=args))
        levels = [float(x) for x in out[1::2]]
        rates = [float(x) for x in out[2::2]]
        return int(out[0]) == 1, levels, rates

    def admit(self, checks: Sequence[Check], *, cost: int, now: float) -> AdmitResult:
        validate_admit(checks, cost)
        ok, levels, rates = self._run(checks, cost=cost, now=now, dry=False)
        return finish(checks, levels, rates, cost=cost, now=now, admitted=ok)

    def usage(self, checks: Sequence[Check], *, now: float) -> tuple[Remaining, ...]:
        if not checks:
            return ()
        _, levels, rates = self._run(checks, cost=1, now=now, dry=True)
        return peek(checks, levels, rates, now)

    def reset(self, checks: Sequence[Check], *, now: float) -> None:
        if checks:
            keys = [self._k(c.storage_key(now)) for c in checks]
            self._call(lambda: self._r.delete(*keys))

    def get_status(self, account: str, *, now: float) -> AccountStatus:
        raw = self._call(lambda: self._r.hget(self._k("s", account), "json"))
        status = None if raw is None else AccountStatus.from_json(raw)
        if status is None or not status.active_at(now):
            return AccountStatus.normal()
        return status

    def set_status(self, account: str, status: AccountStatus) -> None:
        text = status.to_json()
        fields = {
            "kind": status.kind.value,
            "factor": repr(status.factor) if status.kind is StatusKind.THROTTLED else "",
            "expires": "" if status.expires_at is None else repr(status.expires_at),
            "json": text,
        }

        def write() -> None:
            pipe = self._r.pipeline(transaction=True)
            pipe.hset(self._k("s", account), items=[x for kv in fields.items() for x in kv])
            pipe.lpush(self._k("h", account), text)
            pipe.ltrim(self._k("h", account), 0, HISTORY_LIMIT - 1)
            pipe.execute()

        self._call(write)

    def status_history(self, account: str) -> list[AccountStatus]:
        raw = self._call(lambda: self._r.lrange(self._k("h", account), 0, HISTORY_LIMIT - 1))
        return [AccountStatus.from_json(x) for x in raw]

    def get_blob(self, key: str) -> bytes | None:
        raw = self._call(lambda: self._r.get(self._k("blob", key)))
        if raw is None:
            return None
        return raw if isinstance(raw, bytes) else str(raw).encode()

    def put_blob(self, key: str, value: bytes, *, ttl_s: float | None) -> None:
        px = None if ttl_s is None else max(1, math.ceil(ttl_s * 1000))
        self._call(lambda: self._r.set(self._k("blob", key), bytes(value), px=px))

    def consume_once(self, key: str, *, ttl_s: float) -> bool:
        px = max(1, math.ceil(ttl_s * 1000))
        return bool(self._call(lambda: self._r.set(self._k("once", key), b"1", nx=True, px=px)))

    def close(self) -> None:
        self._r.close()
