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

import logging
import secrets
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

from sealserve.attestation.claims import Platform, Policy
from sealserve.attestation.evidence import Evidence, verify_evidence_at_time
from sealserve.attestation.policy import policy_from_toml
from sealserve.attestation.snp_certs import TrustedRoots
from sealserve.attestation.tdx import quote_fmspc
from sealserve.attestation.tdx_collateral import TdxCollateral
from sealserve.broker.nonces import NonceBook, NonceExpired, NonceUnknown
from sealserve.broker.pccs import PccsClient
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
    UnavailableError,
    quote,
)

log = logging.getLogger("sealserve.broker")

REFUSED_MESSAGE = "key release refused"
_POLICY_CACHE = 1024


class _Refusal(Exception):
    """Internal: why a release was refused (logged, never sent)."""

    def __init__(self, reason: str, check: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.check = check


class KeyBroker:
    """Holds the store, the nonce book and the trusted roots; one per broker process.

    ``roots`` maps root names ("amd", "intel", and "unsafe-simulated" only when
    configured) to TrustedRoots. ``clock`` (seconds since the epoch) is the time
    evidence is verified at. TDX evidence is always judged with collateral: the
    evidence's own, else ``tdx_collateral_dir``'s file for the quote's FMSPC, else what
    ``pccs`` fetches; without complete, verified collateral it is refused.
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        nonces: NonceBook,
        roots: Mapping[str, TrustedRoots],
        clock: Callable[[], float] = time.time,
        tdx_collateral_dir: Path | None = None,
        pccs: PccsClient | None = None,
    ) -> None:
        self.store = store
        self._tdx_collateral_dir = tdx_collateral_dir
        self._pccs = pccs
        self.nonces = nonces
        self._roots = dict(roots)
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

        Raises KeyReleaseError(:data:`REFUSED_MESSAGE`) for every refusal (bad
        evidence, unknown/used/expired nonce, unknown or revoked key, no policy,
        failed verification or policy, unusable HPKE key); the reason is logged.
        """
        try:
            sealed, record, ev, detail = self._release(key_id, evidence)
        except _Refusal as refusal:
            key_id = quote(key_id)
            log.warning(
                "key release refused: key_id=%s peer=%s check=%s reason=%s",
                key_id,
                peer,
                refusal.check,
                refusal.reason,
                extra={
                    "event": "key_release_refused",
                    "key_id": key_id,
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

    def _release(self, key_id: str, data: bytes) -> tuple[SealedKey, KeyRecord, Evidence, str]:
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
        # 3. the key and its policy
        record = self.store.get(key_id) if isinstance(key_id, str) else None
        if record is None:
            raise _Refusal(f"unknown key id {quote(key_id)}", "unknown_key")
        if record.revoked:
            raise _Refusal(f"key id {quote(key_id)} is revoked", "revoked_key")
        if not record.policy_toml:
            raise _Refusal("the key has no release policy (default deny)", "no_policy")
        try:
            policy = self._policy(record.policy_toml)
            roots = self._roots_for(record.roots)
        except Exception as exc:  # a stored policy that no longer loads: deny
            raise _Refusal(f"policy or roots unusable: {exc}", "policy_config") from exc
        # 4. verify the evidence: chain, nonce, binding, then the key's policy
        now = datetime.fromtimestamp(self._clock(), UTC)
        try:
            collateral = self._tdx_collateral(evidence)
            claims = verify_evidence_at_time(
                evidence,
                policy=policy,
                roots=roots,
                expected_nonce=evidence.nonce,
                now=now,
                tdx_collateral=collateral,
            )
        except AttestationError as exc:
            raise _Refusal(exc.message, exc.check or type(exc).__name__) from exc
        if claims.platform is Platform.TDX and claims.fields.get("collateral_verified") is not True:
            raise _Refusal(
                "TDX evidence without complete, verified collateral (the broker always "
                "evaluates it: send it in the evidence or set tdx_collateral_dir)",
                "collateral",
            )
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

    def _tdx_collateral(self, evidence: Evidence) -> TdxCollateral | None:
        """The cache's collateral for a TDX quote that brought none of its own; a TDX
        quote with neither is refused here, before anything else is spent on it."""
        if evidence.platform is not Platform.TDX or evidence.certs:
            return None
        found = None
        if self._tdx_collateral_dir is not None or self._pccs is not None:
            fmspc = quote_fmspc(evidence.report)
            if self._tdx_collateral_dir is not None:
                found = TdxCollateral.from_cache_dir(self._tdx_collateral_dir, fmspc)
            if found is None and self._pccs is not None:
                try:
                    found = self._pccs.collateral(fmspc, evidence.report)
                except UnavailableError as exc:
                    raise _Refusal(exc.message, "collateral_fetch") from exc
        if found is None:
            raise _Refusal(
                "TDX evidence without collateral, and none cached for its FMSPC (the broker "
                "always evaluates TDX collateral)",
                "collateral",
            )
        return found

    def _roots_for(self, names: tuple[str, ...]) -> TrustedRoots:
        missing = [n for n in names if n not in self._roots]
        if missing:
            raise KeyReleaseError(f"roots {missing} are not configured in this broker")
        combined = self._roots[names[0]]
        for name in names[1:]:
            combined = combined + self._roots[name]
        return combined

    # -- administration ---------------------------------------------------------

    def add_key(
        self,
        key_id: str,
        key: bytes | None,
        *,
        policy_toml: str = "",
        roots: tuple[str, ...] = (),
        actor: str = "",
    ) -> bytes | None:
        """Store a key (``key=None``: generate one and return it, this once).

        Raises InputError (bad id, existing id, key not 32 bytes) or ConfigError
        (invalid policy or roots).
        """
        check_key_id(key_id, error=InputError)
        check_policy(policy_toml)
        checked = check_roots(roots, simulated_allowed=self.simulated_allowed)
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
        self, key_id: str, *, policy_toml: str, roots: tuple[str, ...] = (), actor: str = ""
    ) -> None:
        """Replace a key's policy (and roots when given). Raises NotFoundError,
        ConfigError."""
        check_policy(policy_toml)
        checked = check_roots(roots, simulated_allowed=self.simulated_allowed) if roots else None
        self.store.set_policy(key_id, policy_toml=policy_toml, roots=checked)
        log.info(
            "admin: policy set: key_id=%r actor=%s",
            key_id,
            actor,
            extra={"event": "policy_set", "key_id": key_id, "actor": actor},
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
