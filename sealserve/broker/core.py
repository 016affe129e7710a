"""The key broker's transport-free core: challenges, key release, administration.

Over 400 lines: one class, the release protocol's numbered steps beside the admin
calls that change what it releases.

Release protocol (docs/key-broker.md):

1. ``challenge()``: a fresh 32-byte nonce, single use, valid for the nonce book's ttl.
2. The enclave makes evidence whose REPORT_DATA binds that nonce, its TLS key, its
   workload manifest and its HPKE public key, and calls ``release(key_id, evidence)``.
3. The broker parses the evidence, redeems its nonce (used up whatever follows),
   verifies it against every root it has (``verify_evidence_at_time``: chain, nonce,
   binding, and for TDX its collateral) before it looks at the key id, then finds the
   live key, checks that the key trusts the root the evidence chains to and that the
   claims pass the key's policy, and seals the data key to the evidence's HPKE public
   key (RFC 9180, ``key_wrap``).

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
from pathlib import Path

from sealserve.attestation.claims import Claims, Platform, Policy
from sealserve.attestation.evidence import Evidence, verify_evidence_at_time
from sealserve.attestation.policy import policy_from_toml
from sealserve.attestation.snp_certs import TrustedRoots
from sealserve.attestation.tdx import quote_fmspc
from sealserve.attestation.tdx_collateral import TdxCollateral
from sealserve.broker.completeness import LAUNCH_REGISTERS, ROOT_FOR_PLATFORM, require_complete
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
    NotFoundError,
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


# Decoy policies (never matching: all-zero values of the launch registers a complete
# policy pins, completeness.LAUNCH_REGISTERS) by platform: the platform rule.
_DECOY_PLATFORM_RULE = {
    Platform.SEV_SNP: 'platforms = ["sev-snp"]',
    Platform.SIMULATED_SNP: "unsafe_allow_simulated = true",
    Platform.TDX: 'platforms = ["tdx"]',
    Platform.AZURE_VTPM: 'platforms = ["azure-vtpm"]',
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
        logged_id = quote(key_id)
        try:
            sealed, record, ev, detail = self._release(key_id, evidence)
        except Exception as exc:  # every failure is the same refusal to the caller
            refusal = (
                exc
                if isinstance(exc, _Refusal)
                else _Refusal(f"unexpected {type(exc).__name__}: {exc}", "internal")
            )
            log.warning(
                "key release refused: key_id=%s peer=%s check=%s reason=%s",
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
        section, registers = LAUNCH_REGISTERS[claims.platform]
        platform_rule = _DECOY_PLATFORM_RULE[claims.platform]
        text = f"version = 1\n{platform_rule}\n[{section}]\n" + "".join(
            f'{r} = ["{"00" * (32 if r.startswith("pcr") else 48)}"]\n' for r in registers
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
        # 3. verify it against every root this broker has (chain, nonce, binding, and
        #    for TDX its collateral); which root it chains to is a claim that the key's
        #    roots decide on (4).
        now = datetime.fromtimestamp(self._clock(), UTC)
        captured = _Captured()
        try:
            collateral = self._tdx_collateral(evidence)
            verify_evidence_at_time(
                evidence,
                policy=captured,
                roots=self._all_roots,
                expected_nonce=evidence.nonce,
                now=now,
                tdx_collateral=collateral,
            )
        except AttestationError as exc:
            raise _Refusal(exc.message, exc.check or type(exc).__name__) from exc
        claims = captured.claims
        if claims.platform is Platform.TDX and claims.fields.get("collateral_verified") is not True:
            raise _Refusal(
                "TDX evidence without complete, verified collateral (the broker always "
                "evaluates it: send it in the evidence or set tdx_collateral_dir)",
                "collateral",
            )
        # 4. the key, its roots and its policy
        record = self.store.get(key_id) if isinstance(key_id, str) else None
        if record is None or record.revoked or not record.policy_toml:
            # A decoy policy of a real key's shape runs first, so that these refusals
            # take as long as one by a key's policy (bench/bench_refusal_timing.py).
            self._decoy(claims)
        if record is None:
            raise _Refusal(f"unknown key id {quote(key_id)}", "unknown_key")
        if record.revoked:
            raise _Refusal(f"key id {quote(key_id)} is revoked", "revoked_key")
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
                raise NotFoundError(f"no live key with id {quote(key_id)}")
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
