"""The broker process: builds every object once from settings and serves gRPC over TLS."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import grpc

from sealserve._proto import broker_pb2_grpc
from sealserve.attestation.snp_certs import TrustedRoots
from sealserve.auth import Authenticator
from sealserve.broker.core import KeyBroker
from sealserve.broker.nonces import NonceBook
from sealserve.broker.pccs import PccsClient
from sealserve.broker.service import KeyBrokerServicer
from sealserve.broker.settings import BrokerSettings
from sealserve.broker.store import ROOT_AMD, ROOT_INTEL, ROOT_SIMULATED, KeyStore
from sealserve.broker.tls import ephemeral_identity, load_identity
from sealserve.errors import ConfigError

log = logging.getLogger("sealserve.broker")


class UnsafeSimulatedRootWarning(UserWarning):
    """The broker offers the simulated platform root: development only."""


def build_broker(
    settings: BrokerSettings,
    *,
    clock: Callable[[], float] | None = None,
    nonce_clock: Callable[[], float] | None = None,
) -> KeyBroker:
    """The core from settings: opens the store under the master key, loads roots.

    Raises ConfigError / CryptoError (wrong master key) / SealedFormatError.
    """
    store = KeyStore.open(settings.store_file, master_key=settings.read_master_key())
    roots = {ROOT_AMD: TrustedRoots.amd(), ROOT_INTEL: TrustedRoots.intel_sgx()}
    if settings.unsafe_simulated_root_dir is not None:
        warnings.warn(
            f"UNSAFE: the key broker trusts the SIMULATED platform root in "
            f"{settings.unsafe_simulated_root_dir} for keys that name 'unsafe-simulated'; "
            "never in production",
            UnsafeSimulatedRootWarning,
            stacklevel=2,
        )
        roots[ROOT_SIMULATED] = TrustedRoots.from_dir(
            settings.unsafe_simulated_root_dir, name="unsafe-simulated"
        )
    nonces = NonceBook(
        ttl=settings.nonce_ttl_seconds,
        max_outstanding=settings.max_outstanding_nonces,
        **({"clock": nonce_clock} if nonce_clock else {}),
    )
    return KeyBroker(
        store,
        nonces=nonces,
        roots=roots,
        tdx_collateral_dir=settings.tdx_collateral_dir,
        pccs=(
            PccsClient(
                settings.tdx_pccs_url,
                timeout=settings.tdx_pccs_timeout_seconds,
                ttl=settings.tdx_pccs_cache_seconds,
            )
            if settings.tdx_pccs_url
            else None
        ),
        **({"clock": clock} if clock else {}),
    )


class BrokerServer:
    """One broker: ``await start()``, then ``port``, ``cert_pem``; ``await stop()``."""

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        broker: KeyBroker | None = None,
        authenticator: Authenticator | None = None,
    ) -> None:
        self.settings = settings
        self.broker = broker or build_broker(settings)
        self.authenticator = authenticator or Authenticator.from_settings(
            settings.admin.auth_settings()
        )
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            ident = load_identity(settings.tls_cert_file, settings.tls_key_file)
        else:
            ident = ephemeral_identity(settings.tls_hostnames)
        self.cert_pem = ident.cert_pem
        self._credentials = grpc.ssl_server_credentials([(ident.key_pem, ident.cert_pem)])
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        """Bind and serve. Raises ConfigError when the address cannot be bound."""
        self.authenticator.start()
        server = grpc.aio.server()
        broker_pb2_grpc.add_KeyBrokerServicer_to_server(
            KeyBrokerServicer(self.broker, self.authenticator), server
        )
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            self.port = server.add_secure_port(address, self._credentials)
        except RuntimeError as exc:
            raise ConfigError(f"cannot bind {address}: {exc}") from exc
        await server.start()
        self._server = server
        out = self.settings.tls_ephemeral_cert_out
        if self.settings.tls_cert_file is None and out is not None:
            _write_public(out, self.cert_pem)
        log.info(
            "key broker listening on %s:%d (%d keys)",
            self.settings.host,
            self.port,
            len(self.broker.list_keys()),
            extra={"event": "broker_started"},
        )

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        self.authenticator.close()


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
