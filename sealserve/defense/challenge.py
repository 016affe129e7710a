"""Proof-of-work challenges for accounts in the *challenged* status.

The server issues a challenge string that it signs with HMAC-SHA256 under a key only it
holds; the client must find a ``solution`` such that SHA-256(challenge ‖ solution) starts
with ``difficulty`` zero bits and send both with its call. Format::

    pow1.<base64url(payload JSON)>.<base64url(HMAC-SHA256(key, label ‖ payload))>

where the payload holds the account, the difficulty, the rows the answer pays for, the
expiry (Unix seconds) and a random nonce. The work scales with the rows asked for:
a challenge for ``rows`` rows carries :func:`row_bits` more bits than the account's
base difficulty (about ``rows`` times the hashes), and is accepted only for a request
of exactly that many rows. The server keeps no state per issued challenge; replays are stopped by
consuming the nonce once in the state store when a solution is accepted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import secrets
from dataclasses import dataclass
from typing import Any

from sealserve.defense.status import MAX_DIFFICULTY
from sealserve.defense.store.base import StateStore
from sealserve.errors import ChallengeRequiredError, ConfigError

MAGIC = "pow1"
_LABEL = b"sealserve proof-of-work challenge v1\x00"
KEY_BYTES = 32


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def leading_zero_bits(digest: bytes) -> int:
    """Number of leading zero bits of ``digest``."""
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def row_bits(rows: int) -> int:
    """Extra difficulty bits for ``rows`` rows: ceil(log2(rows)), so the hashes a
    request costs grow in proportion to its rows (1 row: 0 bits)."""
    return max(0, math.ceil(math.log2(max(1, rows))))


def _work(challenge: str, solution: str) -> int:
    return leading_zero_bits(hashlib.sha256(challenge.encode() + solution.encode()).digest())


@dataclass(frozen=True)
class ChallengeClaims:
    """What a challenge string says (only trustworthy after :meth:`Challenges.verify`)."""

    account: str
    difficulty: int
    expires_at: float
    nonce: str
    rows: int = 1

    @classmethod
    def from_challenge(cls, challenge: str) -> ChallengeClaims:
        """Parse a challenge without checking its MAC. Raises ChallengeRequiredError."""
        try:
            magic, payload, _mac = challenge.split(".")
            if magic != MAGIC:
                raise ValueError("magic")
            data: dict[str, Any] = json.loads(_b64d(payload))
            claims = cls(str(data["a"]), int(data["d"]), float(data["e"]), str(data["n"]),
                         int(data.get("r", 1)))  # fmt: skip
        except (ValueError, KeyError, TypeError) as exc:
            raise ChallengeRequiredError("proof-of-work challenge is malformed") from exc
        return claims


def solve(challenge: str, *, max_tries: int | None = None) -> str:
    """Find a solution for ``challenge`` (client side; about 2**difficulty hashes).

    Raises ChallengeRequiredError for a malformed challenge or when ``max_tries`` runs out.
    """
    difficulty = ChallengeClaims.from_challenge(challenge).difficulty
    prefix = hashlib.sha256(challenge.encode())
    limit = max_tries if max_tries is not None else 1 << (difficulty + 8)
    for counter in range(limit):
        candidate = str(counter)
        h = prefix.copy()
        h.update(candidate.encode())
        if leading_zero_bits(h.digest()) >= difficulty:
            return candidate
    raise ChallengeRequiredError(f"no proof-of-work solution found in {limit} tries")


class Challenges:
    """Issues and verifies proof-of-work challenges.

    ``key`` is the server's HMAC key (32 random bytes; :meth:`generate_key`); ``ttl_s``
    how long an issued challenge can be answered. Raises ConfigError for a short key or
    a non-positive TTL.
    """

    def __init__(self, key: bytes, store: StateStore, *, ttl_s: float = 300.0) -> None:
        if not isinstance(key, bytes) or len(key) < KEY_BYTES:
            raise ConfigError(f"proof-of-work key must be at least {KEY_BYTES} bytes")
        if not ttl_s > 0:
            raise ConfigError(f"challenge ttl must be greater than zero, got {ttl_s!r}")
        self._key = key
        self._store = store
        self.ttl_s = ttl_s

    @staticmethod
    def generate_key() -> bytes:
        return secrets.token_bytes(KEY_BYTES)

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self._key, _LABEL + payload.encode("ascii"), hashlib.sha256).digest()

    def issue(self, account: str, difficulty: int, *, now: float, rows: int = 1) -> str:
        """A fresh challenge for ``account`` valid until ``now + ttl_s``, for a request of
        ``rows`` rows: its difficulty is ``difficulty + row_bits(rows)`` (at most
        MAX_DIFFICULTY)."""
        if not 1 <= difficulty <= MAX_DIFFICULTY:
            raise ConfigError(f"challenge difficulty must be 1..{MAX_DIFFICULTY} bits")
        if rows < 1:
            raise ConfigError(f"a challenge pays for at least 1 row, got {rows}")
        payload = _b64e(
            json.dumps(
                {
                    "a": account,
                    "d": min(MAX_DIFFICULTY, difficulty + row_bits(rows)),
                    "r": rows,
                    "e": math.ceil(now + self.ttl_s),
                    "n": secrets.token_hex(16),
                },
                separators=(",", ":"),
                sort_keys=True,
            ).encode()
        )
        return f"{MAGIC}.{payload}.{_b64e(self._mac(payload))}"

    def verify(
        self, account: str, challenge: str, solution: str, *, now: float, min_difficulty: int = 1,
        rows: int = 1,
    ) -> int:  # fmt: skip
        """Accept ``solution`` to ``challenge`` for ``account`` and a request of ``rows``
        rows once, or raise; return the work proven per row, in bits (the challenge's
        difficulty less :func:`row_bits` of its rows).

        Raises ChallengeRequiredError when the challenge is malformed, not signed by this
        server, expired, issued to another account, easier than ``min_difficulty``,
        wrongly answered, or already used; UnavailableError when the store is down.
        """
        claims = ChallengeClaims.from_challenge(challenge)
        # 1. Authenticity first: nothing in an unsigned payload is believed.
        _magic, payload, mac_text = challenge.split(".")
        try:
            mac = _b64d(mac_text)
        except ValueError as exc:
            raise ChallengeRequiredError("proof-of-work challenge is not valid") from exc
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise ChallengeRequiredError("proof-of-work challenge is not valid")
        # 2. Freshness, binding and strength.
        if now >= claims.expires_at:
            raise ChallengeRequiredError("proof-of-work challenge has expired")
        if not hmac.compare_digest(claims.account.encode(), account.encode()):
            raise ChallengeRequiredError("proof-of-work challenge was issued to another account")
        if claims.rows != rows:
            raise ChallengeRequiredError(
                f"proof-of-work challenge was issued for {claims.rows} rows; this request "
                f"has {rows}: ask for a new challenge"
            )
        if claims.difficulty < min_difficulty:
            raise ChallengeRequiredError("proof-of-work challenge is easier than now required")
        # 3. The work itself.
        if len(solution) > 64 or _work(challenge, solution) < claims.difficulty:
            raise ChallengeRequiredError("proof-of-work answer is wrong")
        # 4. Single use, last, so a wrong answer does not burn the challenge.
        ttl = max(1.0, claims.expires_at - now + 1.0)
        if not self._store.consume_once(f"pow/{claims.nonce}", ttl_s=ttl):
            raise ChallengeRequiredError("proof-of-work challenge was already used")
        return max(0, claims.difficulty - row_bits(claims.rows))
