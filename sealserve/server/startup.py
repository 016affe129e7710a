"""The composition root's steps that touch the world: the platform, the state store and
the guard over it, port binding, and the one way a startup problem is worded.

Each is a function called once by :class:`sealserve.server.app.Server` in its one order;
none keeps state.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sealserve.defense.challenge import Challenges
from sealserve.defense.config import DefenseConfig
from sealserve.defense.guard import Guard
from sealserve.defense.quota import QuotaGuard
from sealserve.defense.store.base import StateStore
from sealserve.defense.store.factory import open_store
from sealserve.enclave.platform import Platform
from sealserve.errors import ConfigError, CryptoError, UnavailableError
from sealserve.server.manifest import simulated_measurement
from sealserve.server.settings import Settings

log = logging.getLogger("sealserve.server")

#: Bytes gRPC accepts beyond the tensors for names, shapes and protobuf framing.
REQUEST_ENVELOPE_BYTES = 1 << 20

STORE_FIX = (
    "Point state_store at a reachable store: sqlite://PATH in a writable directory, "
    "redis://HOST:PORT/DB of a running Redis, or memory: for one process."
)
REPOSITORY_FIX = (
    "Point model_repository at a directory of <model>/<version>/model.onnx or "
    "model.sealed files the server can read, and check the file the message names."
)


@contextmanager
def startup_step(settings: Settings, key: str, *, fix: str | None = None) -> Iterator[None]:
    """Turn a problem found while starting into one ConfigError naming the config file
    and ``key`` (the CLI prints it as one ``error:`` line and exits 2)."""
    try:
        yield
    except CryptoError as exc:  # keeps its class: a tampered model is not a typo
        raise type(exc)(f"{settings.where(key)}: {exc.message}", remedy=exc.remedy) from exc
    except (ConfigError, UnavailableError) as exc:
        raise settings.problem(key, exc, fix=fix) from exc


def select_platform(settings: Settings, code: str) -> Platform | None:
    """The attestation platform the settings ask for (None: no attestation).

    Raises ConfigError or UnavailableError when the requested platform is missing.
    """
    from sealserve.enclave.configfs_tsm import ConfigfsTsmPlatform
    from sealserve.enclave.platform import DEFAULT_CONFIGFS_TSM
    from sealserve.enclave.simulated import SimulatedPlatform

    choice = settings.attestation_platform
    if choice == "none":
        return None
    if choice == "azure-vtpm":
        return _azure_vtpm(settings)
    if choice in ("auto", "configfs-tsm") and Path(DEFAULT_CONFIGFS_TSM).is_dir():
        return ConfigfsTsmPlatform(DEFAULT_CONFIGFS_TSM)
    if choice == "configfs-tsm":
        raise UnavailableError(
            f"attestation_platform 'configfs-tsm' but {DEFAULT_CONFIGFS_TSM} does not exist",
            remedy="Run inside an SEV-SNP or TDX guest with configfs-tsm, or choose "
            "another attestation_platform.",
        )
    if settings.simulated_platform_dir is not None:
        log.warning("attestation: SIMULATED platform (not a real TEE) from %s",
                    settings.simulated_platform_dir)  # fmt: skip
        return SimulatedPlatform(
            settings.simulated_platform_dir, measurement=simulated_measurement(code)
        )
    log.warning("attestation: no TEE found and no simulated platform configured; "
                "GetEvidence is not served")  # fmt: skip
    return None


def _azure_vtpm(settings: Settings) -> Platform:
    from sealserve.enclave.azure_vtpm import AzureVtpmPlatform, Tpm2Tools, fetch_vcek_chain

    path = settings.azure_vcek_chain
    if path is None:
        chain = fetch_vcek_chain()
    else:
        try:
            chain = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"azure_vcek_chain: cannot read {path}: {exc.strerror}") from exc
        if b"-----BEGIN CERTIFICATE-----" not in chain:
            raise ConfigError(f"azure_vcek_chain: {path} holds no PEM certificate")
    log.info("attestation: azure-vtpm (HCL report and vTPM quote)")
    return AzureVtpmPlatform(Tpm2Tools(settings.azure_vtpm_tcti), vcek_chain=chain)


def uses_store(settings: Settings, defense: DefenseConfig | None) -> bool:
    """Whether the server opens the state store ([limits], or a defended model detects)."""
    detects = defense is not None and any(m.detection for m in defense.models.values())
    return settings.limits is not None or detects


def check_store(settings: Settings) -> None:
    """Open the state store and close it again: a parent checks it once before forking
    workers (which then open their own). Raises ConfigError naming ``state_store``."""
    s = settings
    if uses_store(s, s.defense):
        with startup_step(s, "state_store", fix=STORE_FIX):
            open_store(s.state_store, prefix=s.state_store_prefix,
                       unsafe_fail_open=s.unsafe_fail_open).close()  # fmt: skip


def open_guard(
    settings: Settings, defense: DefenseConfig | None
) -> tuple[Guard, StateStore | None]:
    """The admission guard over the state store, and the store (opened when [limits]
    are set or a defended model detects). Raises ConfigError naming ``state_store``."""
    s = settings
    limits = s.limits
    store = None
    if uses_store(s, defense):
        with startup_step(s, "state_store", fix=STORE_FIX):
            store = open_store(
                s.state_store, prefix=s.state_store_prefix, unsafe_fail_open=s.unsafe_fail_open
            )
    # A store that waits on I/O: the release side (detector state, statuses) runs off
    # the event loop, so a hung store cannot stall other RPCs.
    store_io = store is not None and store.blocking
    if limits is None:
        log.warning("no [limits] configured: rate limits and quotas are OFF")
        return Guard(store_deadline_s=s.state_store_deadline_s, store_io=store_io), store
    assert store is not None
    if s.unsafe_fail_open:
        log.warning("unsafe_fail_open: requests are admitted UNCHECKED when the store is down")
    with startup_step(s, "state_store", fix=STORE_FIX):
        pow_key = _pow_key(store)
    quota = QuotaGuard(limits, store, Challenges(pow_key, store))
    return Guard(quota=quota, store_deadline_s=s.state_store_deadline_s, store_io=store_io), store


def _pow_key(store: StateStore) -> bytes:
    """The proof-of-work MAC key, shared by every replica through the state store.

    Two replicas starting at once may both write one; the last wins and a challenge
    issued under the other fails once and is re-issued. It only protects the work
    puzzles (no user data), so keeping it in the shared store is acceptable.
    """
    key = store.get_blob("pow-key")
    if key is None or len(key) < 32:
        key = Challenges.generate_key()
        store.put_blob("pow-key", key, ttl_s=None)
    return key


def receive_limit(max_request_bytes: int) -> int:
    """gRPC's max receive length for a cap: requests up to twice the cap are refused by
    the codec (INVALID_ARGUMENT, the documented message), larger ones by gRPC."""
    return min(2 * max_request_bytes + REQUEST_ENVELOPE_BYTES, 2**31 - 1)


def bind_port(settings: Settings, key: str, address: str, add: Any) -> int:
    """``add(address)`` (a grpc add_*_port), as a ConfigError when it cannot bind."""
    try:
        port = int(add(address))  # 0 (older grpc) or RuntimeError: could not bind
        cause: BaseException | None = None
    except RuntimeError as exc:
        port, cause = 0, exc
    if port == 0:
        raise ConfigError(
            f"{settings.where(key)}: cannot listen on {address}: the port is in use, "
            "or the address is not one of this machine's",
            remedy=f"Choose a free {key} (0 picks one), stop the process using it, or fix "
            "the host.",
        ) from cause
    return port
