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
from typing import TypeVar

import redis

from sealserve.defense.status import AccountStatus
from sealserve.defense.store.base import (
    HISTORY_LIMIT,
    STATE_SLACK_S,
    AdmitResult,
    Check,
    Remaining,
    StateStore,
    blocked_result,
    finish,
    peek,
    resolve,
    validate_cost,
)
from sealserve.errors import ConfigError, UnavailableError

T = TypeVar("T")

# KEYS: one state key per check, then (optionally) the account's status key.
# ARGV[1]: "now cost n dry slack_ms work"; ARGV[2]: per check "kind limit rate ttl_ms
# throttle" (kind 'b'|'w'; ttl_ms of the window; throttle '1': scaled by the account's
# throttle factor), all space-separated: two strings cost the client and the server far
# less than 5n+6 separate arguments.
# Returns {2, status_json} when the status blocks the request (suspended, or challenged
# and work < difficulty), else {admitted, status_json, level_1, rate_1, ..., level_n,
# rate_n}. Numbers travel as %.17g strings because Redis truncates Lua numbers to
# integers. Buckets admit with a shortfall of up to 0.001 token (store.TOKEN_EPS). The
# arithmetic mirrors sealserve.defense.store.base (gate, bucket_level, fits,
# TransactionalStore.admit) exactly.
ADMIT_LUA = """
local h, spec = {}, {}
for w in string.gmatch(ARGV[1], '%S+') do h[#h + 1] = w end
for w in string.gmatch(ARGV[2], '%S+') do spec[#spec + 1] = w end
local now = tonumber(h[1])
local cost = tonumber(h[2])
local n = tonumber(h[3])
local dry = h[4] == '1'
local slack_ms = tonumber(h[5])
local work = tonumber(h[6])
local status_json = ''
local factor = 1
if #KEYS > n then
  local st = redis.call('HMGET', KEYS[n + 1], 'kind', 'factor', 'difficulty', 'expires', 'json')
  if st[1] and st[1] ~= 'normal' and (st[4] == '' or now < tonumber(st[4])) then
    status_json = st[5]
    if not dry then
      if st[1] == 'suspended' then return {2, status_json} end
      if st[1] == 'challenged' and work < tonumber(st[3]) then return {2, status_json} end
    end
    if st[1] == 'throttled' then factor = tonumber(st[2]) end
  end
end
local levels, rates, olds = {}, {}, {}
local ok = true
for i = 1, n do
  local base = (i - 1) * 5
  local limit = tonumber(spec[base + 2])
  local rate = tonumber(spec[base + 3])
  if spec[base + 1] == 'b' then
    if spec[base + 5] == '1' then rate = rate * factor end
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
    local base = (i - 1) * 5
    local limit = tonumber(spec[base + 2])
    if spec[base + 1] == 'b' then
      local tokens = levels[i] - cost
      local ts = now
      if olds[i] and olds[i] > now then ts = olds[i] end
      redis.call('HSET', KEYS[i], 't', string.format('%.17g', tokens),
                 'ts', string.format('%.17g', ts))
      redis.call('PEXPIRE', KEYS[i], math.ceil((limit - tokens) / rates[i] * 1000) + slack_ms)
    else
      redis.call('INCRBY', KEYS[i], cost)
      redis.call('PEXPIRE', KEYS[i], tonumber(spec[base + 4]))
    end
  end
end
local out = {ok and 1 or 0, status_json}
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
            raise ConfigError(f"redis key prefix must be non-empty without spaces, got {prefix!r}")
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
        except redis.ResponseError as exc:
            # Reached, but it answered with an error (out of memory, read-only replica).
            raise UnavailableError(f"state store failed: redis: {exc}") from exc
        except redis.RedisError as exc:
            raise UnavailableError(f"state store unreachable: redis: {exc}") from exc

    def _run(
        self,
        checks: Sequence[Check],
        *,
        cost: int,
        now: float,
        account: str | None,
        work: int,
        dry: bool,
    ) -> tuple[int, AccountStatus | None, list[tuple[str, float]], list[float], list[float]]:
        slots = resolve(checks, now)
        keys = [self._k(k) for k, _ in slots]
        head = f"{now!r} {cost} {len(checks)} {int(dry)} {int(STATE_SLACK_S * 1000)} {work}"
        spec = []
        for c, (_, end) in zip(checks, slots, strict=True):
            if c.period is None:
                spec.append(f"b {c.limit} {float(c.rate)!r} 0 {int(c.throttle)}")
            else:
                ttl_ms = math.ceil((end - now + STATE_SLACK_S) * 1000)
                spec.append(f"w {c.limit} 0.0 {ttl_ms} 0")
        args = [head, " ".join(spec)]
        if account is not None:
            keys.append(self._k("s", account))
        out = self._call(lambda: self._admit_script(keys=keys, args=args))
        status = AccountStatus.from_json(out[1]) if out[1] else None
        levels = [float(x) for x in out[2::2]]
        rates = [float(x) for x in out[3::2]]
        return int(out[0]), status, slots, levels, rates

    def admit(
        self,
        checks: Sequence[Check],
        *,
        cost: int,
        now: float,
        account: str | None = None,
        work: int = 0,
    ) -> AdmitResult:
        validate_cost(cost)
        code, status, slots, levels, rates = self._run(
            checks, cost=cost, now=now, account=account, work=work, dry=False
        )
        if code == 2:
            assert status is not None
            return blocked_result(status, now)
        return finish(
            checks,
            [e for _, e in slots],
            levels,
            rates,
            cost=cost,
            now=now,
            admitted=code == 1,
            status=status,
        )

    def usage(
        self, checks: Sequence[Check], *, now: float, account: str | None = None
    ) -> tuple[Remaining, ...]:
        if not checks:
            return ()
        _, _, slots, levels, rates = self._run(
            checks, cost=1, now=now, account=account, work=0, dry=True
        )
        return peek(checks, [e for _, e in slots], levels, rates, now=now)

    def reset(self, checks: Sequence[Check], *, now: float) -> None:
        if checks:
            keys = [self._k(k) for k, _ in resolve(checks, now)]
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
            "factor": "" if status.factor is None else repr(status.factor),
            "difficulty": "" if status.difficulty is None else str(status.difficulty),
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
