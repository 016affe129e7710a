"""Redis state store, for several replicas sharing limits.

Over 400 lines: one store contract over single Redis and Cluster (scripts, async
deadlines, key schema migration) kept together so the key names live in one place.

Every admit is one round trip: one Lua script, registered once and called with EVALSHA
(redis-py loads it again if the server lost it), which reads every bucket and window,
the account's throttle factor, decides, and writes only if everything fits. Redis runs a
script atomically, so admits are exact under any concurrency.

Clock: the script uses the ``now`` the caller passes, never Redis ``TIME``, so the three
backends give identical answers and tests can inject time. Replicas must therefore run
NTP; a replica whose clock lags can neither refill a bucket backwards nor reopen a window
that another replica has moved past. Key TTLs (``PEXPIRE``, on Redis' own clock) only
reclaim memory: each lasts until the state stops mattering plus an hour of slack.

Keys live under ``<prefix>:`` and carry their subject as a hash tag:
``<prefix>:{a/alice}:a/alice/day/1700006400``, ``<prefix>:{a/alice}:s`` (status),
``<prefix>:{p/203.0.113.9}:p/203.0.113.9/rate``. An account's checks and its status share
one tag, so on Redis Cluster (``redis+cluster://``) each script touches one hash slot:
an admit runs the script once per subject (account with its status first, then peer,
then model), each consuming atomically only if it fits; when a later subject refuses,
what the earlier ones consumed is given back (a refund script), so nothing is ever
over-admitted and a refused request consumes nothing once it has been answered. On one
Redis server the whole admit stays one script and one round trip.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Generator, Sequence
from functools import partial
from typing import Any, TypeVar

import redis
import redis.asyncio
import redis.asyncio.cluster
from redis.cluster import RedisCluster

from sealserve.defense.status import AccountStatus
from sealserve.defense.store import redis_lease
from sealserve.defense.store.base import (
    HISTORY_LIMIT,
    STATE_SLACK_S,
    AdmitResult,
    Check,
    Remaining,
    StateStore,
    account_group,
    blocked_result,
    finish,
    gate,
    peek,
    resolve,
    validate_cost,
    with_deadline,
)
from sealserve.errors import ConfigError, UnavailableError

T = TypeVar("T")

# KEYS: one state key per check, then (optionally) the account's status key.
# ARGV[1]: "now cost n dry slack_ms work [factor]" (factor: the throttle factor that an
# earlier script of the same admit read from the status, on a cluster); ARGV[2]: per
# check "kind limit rate ttl_ms throttle" (kind 'b'|'w'; ttl_ms of the window; throttle
# '1': scaled by the account's throttle factor), all space-separated: two strings cost
# the client and the server far less than 5n+6 separate arguments.
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
local factor = tonumber(h[7] or '1')
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


# Give back what an admit consumed in one subject when another subject refused it.
# KEYS: the subject's state keys; ARGV[1]: cost; ARGV[2]: per key "kind limit window_ttl_ms".
REFUND_LUA = """
local cost = tonumber(ARGV[1])
local spec = {}
for w in string.gmatch(ARGV[2], '%S+') do spec[#spec + 1] = w end
for i = 1, #KEYS do
  local base = (i - 1) * 3
  local limit = tonumber(spec[base + 2])
  if spec[base + 1] == 'b' then
    local t = redis.call('HGET', KEYS[i], 't')
    if t then
      local back = tonumber(t) + cost
      if back > limit then back = limit end
      redis.call('HSET', KEYS[i], 't', string.format('%.17g', back))
    end
  else
    local c = tonumber(redis.call('GET', KEYS[i]) or '0')
    if c > 0 then
      redis.call('DECRBY', KEYS[i], math.min(c, cost))
    end
  end
end
return 1
"""

CLUSTER_SCHEMES = {"redis+cluster://": "redis://", "rediss+cluster://": "rediss://"}

# One step of an admit: which script, its keys and its arguments. The steps are planned
# without I/O (a generator), so the blocking and the asyncio clients share them.
Step = tuple[str, list[str], list[str]]
Outcome = tuple[int, AccountStatus | None, list[tuple[str, float]], list[float], list[float]]


# The key naming scheme: 2 = hash-tagged per subject (Redis Cluster slots).
KEY_SCHEMA = "2"


class RedisStore(StateStore):
    """State in a Redis server (or a Redis Cluster) shared by every replica.

    Raises UnavailableError("state store unreachable: ...") whenever Redis cannot be
    reached or answers with an error; it never admits without an answer.
    """

    def __init__(self, client: redis.Redis | RedisCluster, *, prefix: str = "sealserve") -> None:
        if not prefix or any(c.isspace() or c in "{}" for c in prefix):
            raise ConfigError(
                f"redis key prefix must be non-empty without spaces or braces, got {prefix!r}"
            )
        self._r = client
        self.prefix = prefix
        self.cluster = isinstance(client, RedisCluster)
        self._scripts = {
            "admit": client.register_script(ADMIT_LUA),
            "refund": client.register_script(REFUND_LUA),
        }
        # The serving path's asyncio client, made on first use in the running loop
        # (from_url only; a store built on a given client awaits it in worker threads).
        self._async_factory: Callable[[], Any] | None = None
        self._async: tuple[asyncio.AbstractEventLoop, Any, dict[str, Any]] | None = None
        self._timeout_s = 1.0
        # Leases need scripts that compute keys: a single Redis only.
        self.leases = not self.cluster
        self._lscripts: dict[str, Any] | None = None

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "sealserve", timeout_s: float = 1.0) -> RedisStore:
        """Connect to ``redis://host:port/db`` (or ``redis+cluster://host:port``, any one
        node of a cluster) with bounded connect and read timeouts."""
        kwargs: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
        }
        for scheme, plain in CLUSTER_SCHEMES.items():
            if url.startswith(scheme):
                node = plain + url.removeprefix(scheme)
                store = cls(RedisCluster.from_url(node, **kwargs), prefix=prefix)
                store._async_factory = partial(
                    redis.asyncio.cluster.RedisCluster.from_url, node, **kwargs
                )
                store._timeout_s = timeout_s
                return store
        store = cls(redis.Redis.from_url(url, health_check_interval=30, **kwargs), prefix=prefix)
        store._async_factory = partial(
            redis.asyncio.Redis.from_url, url, health_check_interval=30, **kwargs
        )
        return store

    def _k(self, group: str, key: str) -> str:
        return f"{self.prefix}:{{{group}}}:{key}"

    def _status_key(self, account: str, kind: str = "s") -> str:
        group = account_group(account)
        return self._k(group, kind)

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except redis.RedisError as exc:
            raise _unavailable(exc) from exc

    # -- an admit, planned as steps ---------------------------------------------------

    def _script_args(
        self,
        checks: Sequence[Check],
        slots: Sequence[tuple[str, float]],
        *,
        cost: int,
        now: float,
        work: int,
        dry: bool,
        factor: float = 1.0,
    ) -> tuple[list[str], list[str]]:
        keys = [self._k(c.group, k) for c, (k, _) in zip(checks, slots, strict=True)]
        head = f"{now!r} {cost} {len(checks)} {int(dry)} {int(STATE_SLACK_S * 1000)} {work}"
        if factor != 1.0:
            head += f" {factor!r}"
        spec = []
        for c, (_, end) in zip(checks, slots, strict=True):
            if c.period is None:
                spec.append(f"b {c.limit} {float(c.rate)!r} 0 {int(c.throttle)}")
            else:
                ttl_ms = math.ceil((end - now + STATE_SLACK_S) * 1000)
                spec.append(f"w {c.limit} 0.0 {ttl_ms} 0")
        return keys, [head, " ".join(spec)]

    def _groups(self, checks: Sequence[Check], account: str | None) -> list[list[int]]:
        """Check indexes per group, the account's group (holding the status) first."""
        order: dict[str, list[int]] = {}
        if account is not None:
            order[account_group(account)] = []
        for i, c in enumerate(checks):
            order.setdefault(c.group, []).append(i)
        return list(order.values())

    def _plan(
        self,
        checks: Sequence[Check],
        *,
        cost: int,
        now: float,
        account: str | None,
        work: int,
        dry: bool,
    ) -> Generator[Step, Any, Outcome]:
        slots = resolve(checks, now)
        if not self.cluster:
            keys, args = self._script_args(checks, slots, cost=cost, now=now, work=work, dry=dry)
            if account is not None:
                keys.append(self._status_key(account))
            out = yield ("admit", keys, args)
            status = AccountStatus.from_json(out[1]) if out[1] else None
            return (int(out[0]), status, slots,
                    [float(x) for x in out[2::2]], [float(x) for x in out[3::2]])  # fmt: skip
        # Cluster: one script per group (one hash slot each), all or nothing by refunds.
        levels = [0.0] * len(checks)
        rates = [0.0] * len(checks)
        status = None
        code = 1
        consumed: list[list[int]] = []
        for n, group in enumerate(self._groups(checks, account)):
            sub = [checks[i] for i in group]
            sub_slots = [slots[i] for i in group]
            # The status is read by the first script; later ones get its throttle factor.
            factor = gate(status, now=now, work=work)[2]
            keys, args = self._script_args(
                sub, sub_slots, cost=cost, now=now, work=work, dry=dry or code != 1, factor=factor
            )
            if n == 0 and account is not None:
                keys.append(self._status_key(account))
            out = yield ("admit", keys, args)
            if n == 0 and account is not None and out[1]:
                status = AccountStatus.from_json(out[1])
            if int(out[0]) == 2:
                return 2, status, slots, [], []
            for j, i in enumerate(group):
                levels[i], rates[i] = float(out[2 + 2 * j]), float(out[3 + 2 * j])
            if code == 1 and not dry and group:
                if int(out[0]) == 1:
                    consumed.append(group)
                else:
                    code = 0
            elif int(out[0]) == 0:
                code = 0
        if code == 0:
            for group in consumed:
                keys = [self._k(checks[i].group, slots[i][0]) for i in group]
                spec = " ".join(
                    f"{'b' if checks[i].period is None else 'w'} {checks[i].limit} 0" for i in group
                )
                yield ("refund", keys, [str(cost), spec])
        return code, status, slots, levels, rates

    def _run(self, plan: Generator[Step, Any, Outcome]) -> Outcome:
        """Carry out a planned admit with the blocking client."""
        try:
            step = next(plan)
            while True:
                name, keys, args = step
                script = self._scripts[name]
                out = self._call(lambda: script(keys=keys, args=args))  # noqa: B023
                step = plan.send(out)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def _async_client(self) -> tuple[Any, dict[str, Any]] | None:
        if self._async_factory is None:
            return None
        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:
            client = self._async_factory()
            if self.cluster:
                # Learning the slot map is a one-off: it gets the connect timeout, not
                # the per-request deadline.
                await with_deadline(self._acall(client.initialize()), self._timeout_s)
            scripts = {
                "admit": client.register_script(ADMIT_LUA),
                "refund": client.register_script(REFUND_LUA),
                "lease": client.register_script(redis_lease.LEASE_LUA),
            }
            self._async = (loop, client, scripts)
        return self._async[1], self._async[2]

    async def _acall(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except redis.RedisError as exc:
            raise _unavailable(exc) from exc

    async def _run_async(
        self, plan: Generator[Step, Any, Outcome], scripts: dict[str, Any]
    ) -> Outcome:
        """Carry out a planned admit with the asyncio client."""
        try:
            step = next(plan)
            while True:
                name, keys, args = step
                out = await self._acall(scripts[name](keys=keys, args=args))
                step = plan.send(out)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def admit_async(
        self,
        checks: Sequence[Check],
        *,
        cost: int,
        now: float,
        account: str | None = None,
        work: int = 0,
        deadline_s: float,
    ) -> AdmitResult:
        """:meth:`admit` on redis-py's asyncio client, within ``deadline_s`` seconds.
        A deadline that passes mid-way on a cluster may leave an earlier subject's
        consumption unrefunded: the request is refused, nothing is over-admitted."""
        validate_cost(cost)
        got = await self._async_client()
        if got is None:
            return await super().admit_async(
                checks, cost=cost, now=now, account=account, work=work, deadline_s=deadline_s
            )
        plan = self._plan(checks, cost=cost, now=now, account=account, work=work, dry=False)
        outcome = await with_deadline(self._run_async(plan, got[1]), deadline_s)
        return self._result(checks, outcome, cost=cost, now=now)

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
        outcome = self._run(
            self._plan(checks, cost=cost, now=now, account=account, work=work, dry=False)
        )
        return self._result(checks, outcome, cost=cost, now=now)

    @staticmethod
    def _result(checks: Sequence[Check], outcome: Outcome, *, cost: int, now: float) -> AdmitResult:
        code, status, slots, levels, rates = outcome
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
            self._plan(checks, cost=1, now=now, account=account, work=0, dry=True)
        )
        return peek(checks, [e for _, e in slots], levels, rates, now=now)

    def reset(self, checks: Sequence[Check], *, now: float) -> None:
        keys = [self._k(c.group, k) for c, (k, _) in zip(checks, resolve(checks, now), strict=True)]
        if self.leases:
            redis_lease.void(self, keys)
        for key in keys:  # one key per command: keys of several slots on a cluster
            self._call(lambda: self._r.delete(key))  # noqa: B023

    def _lease_scripts(self) -> dict[str, Any]:
        if self._lscripts is None:
            self._lscripts = {
                "lease": self._r.register_script(redis_lease.LEASE_LUA),
                "return": self._r.register_script(redis_lease.RETURN_LUA),
                "void": self._r.register_script(redis_lease.VOID_LUA),
            }
        return self._lscripts

    lease = redis_lease.take_lease
    lease_async = redis_lease.take_lease_async

    async def get_status_async(
        self, account: str, *, now: float, deadline_s: float
    ) -> AccountStatus:
        got = await self._async_client()
        if got is None:
            return await super().get_status_async(account, now=now, deadline_s=deadline_s)
        read = self._acall(got[0].hget(self._status_key(account), "json"))
        raw = await with_deadline(read, deadline_s)
        status = None if raw is None else AccountStatus.from_json(raw)
        if status is None or not status.active_at(now):
            return AccountStatus.normal()
        return status

    def return_lease(self, lease_id: str, unused: int, *, now: float) -> None:
        if self.leases:
            redis_lease.give_back(self, lease_id, unused)

    def get_status(self, account: str, *, now: float) -> AccountStatus:
        raw = self._call(lambda: self._r.hget(self._status_key(account), "json"))
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
        skey, hkey = self._status_key(account), self._status_key(account, "h")

        def write() -> None:
            # Both keys carry the account's tag: one slot, so a transaction on a cluster.
            pipe = self._r.pipeline(transaction=True)
            pipe.hset(skey, items=[x for kv in fields.items() for x in kv])
            pipe.lpush(hkey, text)
            pipe.ltrim(hkey, 0, HISTORY_LIMIT - 1)
            pipe.execute()

        self._call(write)

    def status_history(self, account: str) -> list[AccountStatus]:
        hkey = self._status_key(account, "h")
        raw = self._call(lambda: self._r.lrange(hkey, 0, HISTORY_LIMIT - 1))
        return [AccountStatus.from_json(x) for x in raw]

    def get_blob(self, key: str) -> bytes | None:
        raw = self._call(lambda: self._r.get(self._blob_key(key)))
        if raw is None:
            return None
        return raw if isinstance(raw, bytes) else str(raw).encode()

    def _blob_key(self, key: str) -> str:
        return f"{self.prefix}:blob:{key}"

    def put_blob(self, key: str, value: bytes, *, ttl_s: float | None) -> None:
        px = None if ttl_s is None else max(1, math.ceil(ttl_s * 1000))
        self._call(lambda: self._r.set(self._blob_key(key), bytes(value), px=px))

    def consume_once(self, key: str, *, ttl_s: float) -> bool:
        px = max(1, math.ceil(ttl_s * 1000))
        name = f"{self.prefix}:once:{key}"
        return bool(self._call(lambda: self._r.set(name, b"1", nx=True, px=px)))

    def migrate_legacy_keys(self) -> int:
        """Rename the keys of a single Redis written before keys were hash-tagged
        (statuses ``<prefix>:s:<account>``, histories ``<prefix>:h:<account>``, buckets
        and windows ``<prefix>:a/...``, ``am/``, ``p/``, ``m/``) to today's names, keeping
        their TTLs; an existing new key wins. Returns how many keys were renamed. Run it
        once, before the upgraded servers take traffic (docs/quotas.md)."""
        if self.cluster:
            raise ConfigError("legacy keys exist only on a single Redis, not on a cluster")
        renamed = 0
        head = f"{self.prefix}:"
        for raw in self._call(lambda: list(self._r.scan_iter(match=head + "*", count=1000))):
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            rest = key.removeprefix(head)
            new = _legacy_name(rest)
            if new is None:
                continue
            group, name = new
            moved = self._call(lambda: self._r.renamenx(key, self._k(group, name)))  # noqa: B023
            renamed += int(bool(moved))
        return renamed

    def ensure_schema(self) -> int:
        """Bring a single Redis written before keys were hash-tagged to today's names,
        once: :meth:`migrate_legacy_keys`, then a marker key (``<prefix>:schema``) that
        says it was done, so a later open costs one GET. Called whenever a store is
        opened (``open_store``), so an upgraded server never serves an account whose
        suspension sits under an old name. Returns how many keys were renamed (0 on a
        cluster, which never held legacy keys). Raises UnavailableError when Redis
        cannot be reached."""
        if self.cluster:
            return 0
        marker = f"{self.prefix}:schema"
        if self._call(lambda: self._r.get(marker)) == KEY_SCHEMA.encode():
            return 0
        renamed = self.migrate_legacy_keys()
        self._call(lambda: self._r.set(marker, KEY_SCHEMA))
        return renamed

    def close(self) -> None:
        self._close_pool()
        self._r.close()
        if self._async is not None:
            loop, client, _ = self._async
            self._async = None
            try:
                if asyncio.get_running_loop() is loop:
                    loop.create_task(client.aclose())
            except RuntimeError:  # no running loop: its connections go with it
                pass


def _unavailable(exc: redis.RedisError) -> UnavailableError:
    if isinstance(exc, redis.ResponseError):
        # Reached, but it answered with an error (out of memory, read-only replica).
        return UnavailableError(f"state store failed: redis: {exc}")
    return UnavailableError(f"state store unreachable: redis: {exc}")


def _legacy_name(rest: str) -> tuple[str, str] | None:
    """(group, name) of a pre-hash-tag key (``rest`` is the key after the prefix)."""
    if rest.startswith(("{", "blob:", "once:")):
        return None
    if rest.startswith(("s:", "h:")):
        return account_group(rest[2:]), rest[0]
    scope, _, tail = rest.partition("/")
    subject = tail.split("/", 1)[0]
    if scope in ("a", "p", "m") and subject:
        return f"{scope}/{subject}", rest
    if scope == "am" and subject:
        return f"a/{subject}", rest
    return None
