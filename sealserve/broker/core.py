"""The key broker's transport-free core: challenges, key release, administration.

Release protocol (docs/key-broker.md):

1. ``challenge()``: a fresh 32-byte nonce, single use, valid for the nonce book's ttl.
2. The enclave makes evidence whose REPORT_DATA binds that nonce, its TLS key, its
   workload manifest and its HPKE public key, and calls ``release(key_id, evidence)``.
3. The broker parses the evidence, redeems its nonce (used up whatever follows),
   finds the live key and its policy, verifies the evidence against the key's trusted
   roots and policy (``verify_evidence_at_time``: chain, nonce, binding, policy) and
   seals the data key to the evidence's HPKE public key (RFC 9180, ``key_wrap``).

Every release and refusal is logged on ``sealserve.broker`` with the key id, the peer
and, for a refusal, the reason. The caller of a refused release learns only
:data:`REFUSED_MESSAGE`: which check failed is for the log.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from sealserve.attestation.claims import Claims, Platform, Policy
from sealserve.attestation.evidence import Evidence, verify_evidence_at_time
from sealserve.attestation.policy import policy_from_toml
from sealserve.attestation.snp_certs import TrustedRoots
from sealserve.broker.completeness import ROOT_FOR_PLATFORM, require_complete
from sealserve.broker.nonces import NonceBook, NonceExpired, NonceUnknown
from sealserve.broker.store import (
    DATA_KEY_LEN,
    ROOT_SIMULATED,
    KeyRecord,
    KeyStore,
    check_policy,
    check_roots,
)
from sealserve.enclave.key_wrap import SealedKey, seal_data_key
from sealserve.enclave.model_file import check_key_id
from sealserve.errors import (
    AttestationError,
    CryptoError,
    InputError,
    KeyReleaseError,
    NotFoundError,
)

log = logging.getLogger("sealserve.broker")

REFUSED_MESSAGE = "key release refused"
_POLICY_CACHE = 1024
_LOGGED_ID = 256  # longest key id quoted in the log (ids come from unauthenticated callers)


class _Refusal(Exception):
    """Internal: why a release was refused (logged, never sent)."""

    def __init__(self, reason: str, check: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.check = check


# Decoy policies (never matching: all-zero measurements) by platform: section and
# registers, and the platform rule.
_DECOYS = {
    Platform.SEV_SNP: (("sev-snp", ("measurement",)), 'platforms = ["sev-snp"]'),
    Platform.SIMULATED_SNP: (("sev-snp", ("measurement",)), "unsafe_allow_simulated = true"),
    Platform.TDX: (("tdx", ("mrtd", "rtmr0", "rtmr1", "rtmr2")), 'platforms = ["tdx"]'),
}


class _Captured:
    """Internal: the policy slot of :func:`verify_evidence_at_time` while the key is not
    yet known. It keeps the verified claims; the key's own policy decides on them."""

    def __init__(self) -> None:
        self._claims: Claims | None = None

    def verify(self, claims: Claims) -> None:
        self._claims = claims

    @property
    def claims(self) -> Claims:
        if self._claims is None:  # verification returned without reaching its policy
            raise _Refusal("verification did not reach its policy step", "internal")
        return self._claims


class KeyBroker:
    """Holds the store, the nonce book and the trusted roots; one per broker process.

    ``roots`` maps root names ("amd", and "unsafe-simulated" only when configured) to
    TrustedRoots. ``clock`` (seconds since the epoch) is the time evidence is
    verified at.
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        nonces: NonceBook,
        roots: Mapping[str, TrustedRoots],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.nonces = nonces
        self._roots = dict(roots)
        # Evidence is verified against all of them before the key is looked up (one cost
        # for every key id); the key's ``roots`` then say which one it accepts.
        all_roots = [self._roots[name] for name in sorted(self._roots)]
        self._all_roots = all_roots[0] if all_roots else TrustedRoots.amd()
        for more in all_roots[1:]:
            self._all_roots = self._all_roots + more
        self._clock = clock
        # Parsed policies by their text (policies are immutable; bounded by the key count).
        self._policies: dict[str, Policy] = {}

    def _policy(self, text: str) -> Policy:
        policy = self._policies.get(text)
        if policy is None:
            if len(self._policies) >= _POLICY_CACHE:
                self._policies.clear()
            policy = self._policies[text] = policy_from_toml(text)
        return policy

    @property
    def simulated_allowed(self) -> bool:
        return ROOT_SIMULATED in self._roots

    # -- release ----------------------------------------------------------------

    def challenge(self) -> bytes:
        """A fresh single-use nonce. Raises OverloadedError when too many are open."""
        return self.nonces.issue()

    def release(self, key_id: str, evidence: bytes, *, peer: str = "") -> SealedKey:
        """The data key of ``key_id`` sealed to the evidence's HPKE key.

        Raises KeyReleaseError(:data:`REFUSED_MESSAGE`) for every refusal, whatever
        its cause (bad evidence, unknown/used/expired nonce, a chain or certificate
        that fails, even one that trips an unexpected error, unknown or revoked key,
        no policy, untrusted root, failed policy, unusable HPKE key); the reason is
        logged only.
        """
        logged_id = key_id[:_LOGGED_ID] if isinstance(key_id, str) else type(key_id).__name__
        try:
            sealed, record, ev, detail = self._release(key_id, evidence)
        except Exception as exc:  # every failure is the same refusal to the caller
            refusal = (
                exc
                if isinstance(exc, _Refusal)
                else _Refusal(f"unexpected {type(exc).__name__}: {exc}", "internal")
            )
            log.warning(
                "key release refused: key_id=%r peer=%s check=%s reason=%s",
                logged_id,
                peer,
                refusal.check,
                refusal.reason,
                exc_info=None if refusal is exc else exc,
                extra={
                    "event": "key_release_refused",
                    "key_id": logged_id,
                    "peer": peer,
                    "check": refusal.check,
                    "reason": refusal.reason,
                },
            )
            raise KeyReleaseError(
                REFUSED_MESSAGE,
                remedy="The broker's log says why; compare the enclave's evidence with the "
                "key's release policy.",
            ) from None
        log.info(
            "key released: key_id=%r peer=%s platform=%s %s",
            record.key_id,
            peer,
            ev.platform.value,
            detail,
            extra={
                "event": "key_released",
                "key_id": record.key_id,
                "peer": peer,
                "platform": ev.platform.value,
                "manifest_sha256": ev.manifest_digest.hex(),
            },
        )
        return sealed

    def _decoy(self, claims: Claims) -> None:
        register, platform_rule = _DECOYS[claims.platform]
        text = f"version = 1\n{platform_rule}\n[{register[0]}]\n" + "".join(
            f'{r} = ["{"00" * 48}"]\n' for r in register[1]
        )
        with contextlib.suppress(AttestationError):
            self._policy(text).verify(claims)

    def _release(self, key_id: str, data: bytes) -> tuple[SealedKey, KeyRecord, Evidence, str]:
        # The evidence is verified in full (steps 1-3) before the key id is looked at,
        # so an existing and an unknown key id cost the same and fail the same way.
        # 1. parse the evidence
        try:
            evidence = Evidence.from_bytes(data)
        except AttestationError as exc:
            raise _Refusal(exc.message, "evidence") from exc
        # 2. redeem its nonce: single use, whatever happens next
        try:
            self.nonces.redeem(evidence.nonce)
        except NonceUnknown as exc:
            raise _Refusal(str(exc), "nonce_unknown_or_replayed") from exc
        except NonceExpired as exc:
            raise _Refusal(str(exc), "nonce_expired") from exc
        # 3. verify it against every root this broker has (chain, nonce, binding);
        #    which root it chains to is a claim that the key's roots decide on (4).
        now = datetime.fromtimestamp(self._clock(), UTC)
        captured = _Captured()
        try:
            verify_evidence_at_time(
                evidence,
                policy=captured,
                roots=self._all_roots,
                expected_nonce=evidence.nonce,
                now=now,
            )
        except AttestationError as exc:
            raise _Refusal(exc.message, exc.check or type(exc).__name__) from exc
        claims = captured.claims
        # 4. the key, its roots and its policy
        record = self.store.get(key_id) if isinstance(key_id, str) else None
        if record is None or record.revoked or not record.policy_toml:
            # A decoy policy of a real key's shape runs first, so that these refusals
            # take as long as one by a key's policy (bench/bench_refusal_timing.py).
            self._decoy(claims)
        if record is None:
            raise _Refusal(f"unknown key id {key_id[:_LOGGED_ID]!r}", "unknown_key")
        if record.revoked:
            raise _Refusal(f"key id {key_id!r} is revoked", "revoked_key")
        if not record.policy_toml:
            raise _Refusal("the key has no release policy (default deny)", "no_policy")
        root = ROOT_FOR_PLATFORM[claims.platform]
        if root not in record.roots:
            raise _Refusal(
                f"{claims.platform.value} evidence chains to the {root!r} root, which this "
                f"key does not trust (its roots: {', '.join(record.roots) or 'none'})",
                "trusted_root",
            )
        try:
            policy = self._policy(record.policy_toml)
        except Exception as exc:  # a stored policy that no longer loads: deny
            raise _Refusal(f"policy unusable: {exc}", "policy_config") from exc
        try:
            policy.verify(claims)
        except AttestationError as exc:
            raise _Refusal(exc.message, exc.check or type(exc).__name__) from exc
        # 5. seal the key to the attested HPKE public key
        try:
            sealed = seal_data_key(
                record.key,
                recipient_public_key=evidence.hpke_public_key,
                key_id=record.key_id,
                nonce=evidence.nonce,
            )
        except CryptoError as exc:
            raise _Refusal(exc.message, "hpke_public_key") from exc
        measurement = claims.measurements.get("measurement", b"")
        detail = f"measurement={measurement.hex()}" if measurement else ""
        return sealed, record, evidence, detail

    # -- administration ---------------------------------------------------------

    def add_key(
        self,
        key_id: str,
        key: bytes | None,
        *,
        policy_toml: str = "",
        roots: tuple[str, ...] = (),
        actor: str = "",
        unsafe_allow_incomplete: bool = False,
    ) -> bytes | None:
        """Store a key (``key=None``: generate one and return it, this once).

        A policy, when given, must be complete (:func:`require_complete`: platforms,
        roots, a launch measurement per platform) unless ``unsafe_allow_incomplete``.
        Raises InputError (bad id, existing id, key not 32 bytes) or ConfigError
        (invalid or incomplete policy, bad roots).
        """
        check_key_id(key_id, error=InputError)
        check_policy(policy_toml)
        checked = check_roots(roots, simulated_allowed=self.simulated_allowed)
        if policy_toml:
            self._require_complete(key_id, policy_toml, checked, unsafe_allow_incomplete, actor)
        generated = key is None
        material = secrets.token_bytes(DATA_KEY_LEN) if key is None else key
        self.store.add(key_id, material, policy_toml=policy_toml, roots=checked)
        log.info(
            "admin: key added: key_id=%r actor=%s generated=%s roots=%s has_policy=%s",
            key_id,
            actor,
            generated,
            ",".join(checked),
            bool(policy_toml),
            extra={"event": "key_added", "key_id": key_id, "actor": actor},
        )
        return material if generated else None

    def set_policy(
        self,
        key_id: str,
        *,
        policy_toml: str,
        roots: tuple[str, ...] = (),
        actor: str = "",
        unsafe_allow_incomplete: bool = False,
    ) -> None:
        """Replace a key's policy (and roots when given; otherwise the key's roots stay).

        The policy and the roots the key ends up with must be complete unless
        ``unsafe_allow_incomplete``. Raises NotFoundError, ConfigError.
        """
        check_policy(policy_toml)
        checked = check_roots(roots, simulated_allowed=self.simulated_allowed) if roots else None
        if checked is None:
            current = self.store.get(key_id) if isinstance(key_id, str) else None
            if current is None or current.revoked:
                raise NotFoundError(f"no live key with id {str(key_id)[:_LOGGED_ID]!r}")
            effective = current.roots
        else:
            effective = checked
        self._require_complete(key_id, policy_toml, effective, unsafe_allow_incomplete, actor)
        self.store.set_policy(key_id, policy_toml=policy_toml, roots=checked)
        log.info(
            "admin: policy set: key_id=%r actor=%s",
            key_id,
            actor,
            extra={"event": "policy_set", "key_id": key_id, "actor": actor},
        )

    def _require_complete(
        self, key_id: str, policy_toml: str, roots: tuple[str, ...], unsafe: bool, actor: str
    ) -> None:
        missing = require_complete(policy_toml, roots, unsafe_allow_incomplete=unsafe)
        if missing:  # only reached with the unsafe flag: say so, every time
            log.warning(
                "admin: UNSAFE incomplete release policy accepted: key_id=%r actor=%s missing=%s",
                key_id,
                actor,
                "; ".join(missing),
                extra={"event": "unsafe_incomplete_policy", "key_id": key_id, "actor": actor},
            )

    def list_keys(self) -> list[KeyRecord]:
        return self.store.list()

    def revoke_key(self, key_id: str, *, actor: str = "") -> None:
        """Erase a key's material for good. Raises NotFoundError."""
        if not isinstance(key_id, str) or not key_id:
            raise InputError("a key id is required")
        self.store.revoke(key_id)
        log.info(
            "admin: key revoked: key_id=%r actor=%s",
            key_id,
            actor,
            extra={"event": "key_revoked", "key_id": key_id, "actor": actor},
        )
