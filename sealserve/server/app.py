"""The composition root: builds every server object once and wires them together."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sealserve._proto import (
    POOL,
    admin_pb2,
    admin_pb2_grpc,
    attestation_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
)
from sealserve._proto import attestation_pb2 as apb
from sealserve._proto import grpc_service_pb2 as pb
from sealserve._proto import grpc_service_pb2_grpc as pb_grpc
from sealserve.attestation.runtime_keys import RuntimeKeys
from sealserve.auth import Authenticator
from sealserve.auth.revocation import FileRevocationList
from sealserve.defense.audit.head import sign_head
from sealserve.defense.audit.log import AuditLog
from sealserve.defense.challenge import Challenges
from sealserve.defense.guard import Guard
from sealserve.defense.quota import QuotaGuard
from sealserve.defense.store.base import StateStore
from sealserve.defense.store.factory import open_store
from sealserve.enclave.hardening import HardeningReport, harden_process
from sealserve.enclave.manifest import WorkloadManifest, code_digest
from sealserve.enclave.platform import Platform
from sealserve.enclave.tls import TlsIdentity
from sealserve.errors import ConfigError, CryptoError, UnavailableError
from sealserve.server.dataplane import DataPlane
from sealserve.server.defenses import DefenseSecrets, build_defenses
from sealserve.server.engine import Engine
from sealserve.server.grpc.admin_service import AdminServicer
from sealserve.server.grpc.attestation_service import AttestationServicer
from sealserve.server.grpc.audit_service import AuditServicer
from sealserve.server.grpc.auth_interceptor import AuthenticatingRegistrar
from sealserve.server.grpc.servicer import InferenceServicer
from sealserve.server.manifest import (
    build_manifest,
    is_real_platform,
    measure_entries,
    runtime_json,
    runtime_keys_for,
    simulated_measurement,
)
from sealserve.server.metrics import Metrics
from sealserve.server.model_keys import KeyProvider
from sealserve.server.repository import ModelEntry, scan_repository
from sealserve.server.rest.app import RestApp
from sealserve.server.rest.server import RestServer
from sealserve.server.settings import RestSettings, Settings

log = logging.getLogger("sealserve.server")

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
ATTESTATION_SERVICE = apb.DESCRIPTOR.services_by_name["Attestation"].full_name
MODEL_INFER = f"/{INFERENCE_SERVICE}/ModelInfer"
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
AUDIT_SERVICE = audit_pb2.DESCRIPTOR.services_by_name["Audit"].full_name
# Names in the in-memory certificate. Attested clients pin the certificate itself and
# connect with the fixed name ``sealserve.attested``, whatever host they dialled.
ATTESTED_TLS_NAMES = ("sealserve.attested", "localhost", "127.0.0.1", "::1")


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


def _ensure_health_in_pool() -> None:
    # Reflection answers from our private pool; give it the health service too.
    try:
        POOL.FindFileByName(health_pb2.DESCRIPTOR.name)
    except KeyError:
        POOL.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)


#: Bytes gRPC accepts beyond the tensors for names, shapes and protobuf framing.
REQUEST_ENVELOPE_BYTES = 1 << 20


def receive_limit(max_request_bytes: int) -> int:
    """gRPC's max receive length for a cap: requests up to twice the cap are refused by
    the codec (INVALID_ARGUMENT, the documented message), larger ones by gRPC."""
    return min(2 * max_request_bytes + REQUEST_ENVELOPE_BYTES, 2**31 - 1)


STORE_FIX = (
    "Point state_store at a reachable store: sqlite://PATH in a writable directory, "
    "redis://HOST:PORT/DB of a running Redis, or memory: for one process."
)
REPOSITORY_FIX = (
    "Point model_repository at a directory of <model>/<version>/model.onnx or "
    "model.sealed files the server can read, and check the file the message names."
)


def _bind(settings: Settings, key: str, address: str, add: Any) -> int:
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


class Server:
    """A sealserve gRPC server. ``await start()``, then ``await wait()`` or ``stop()``."""

    def __init__(
        self,
        settings: Settings,
        *,
        entries: list[ModelEntry] | None = None,
        authenticator: Authenticator | None = None,
        hardening: HardeningReport | None = None,
    ) -> None:
        self.settings = settings
        self.hardening = hardening
        self.keys = KeyProvider(broker=settings.key_broker)
        self.defense_secrets: DefenseSecrets | None = None
        self.metrics = Metrics()
        self.engine = Engine(self.metrics, threads=settings.engine.intra_op_threads)
        self.store: StateStore | None = None
        self.plane = DataPlane(
            self.engine,
            server_name=settings.server_name,
            max_request_bytes=settings.max_request_bytes,
            guard=self._build_guard(),
        )
        self._entries = entries
        self.health = health.aio.HealthServicer()
        self.tls: TlsIdentity | None = None
        self.port = 0
        self.health_port = 0
        self.rest: RestServer | None = None
        self.rest_port = 0
        self._health_server: grpc.aio.Server | None = None
        self.manifest: WorkloadManifest | None = None
        self.runtime_keys = RuntimeKeys()
        self.platform: Platform | None = None
        # The enclave's key-release key: brokers seal model keys to it (HPKE, X25519).
        self.hpke_private_key = X25519PrivateKey.generate()
        self.hpke_public_key = self.hpke_private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        if authenticator is None and not settings.unsafe_disable_auth:
            auth_settings = settings.auth_settings()
            assert auth_settings is not None  # Settings guarantees auth or unsafe flag
            with startup_step(settings, "auth"):
                authenticator = Authenticator.from_settings(
                    auth_settings,
                    revocation=(
                        FileRevocationList(auth_settings.revocation_file)
                        if auth_settings.revocation_file
                        else None
                    ),
                )
        self.authenticator = authenticator
        # gRPC refuses a message before reading it only with its own RESOURCE_EXHAUSTED;
        # its limit sits at twice the cap (plus framing) so that every request up to
        # there reaches the codec and gets INVALID_ARGUMENT with the documented message.
        limit = receive_limit(settings.max_request_bytes)
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ],
        )

    def _build_guard(self) -> Guard:
        s = self.settings
        limits = s.limits_config()
        if limits is None:
            log.warning("no [limits] configured: rate limits and quotas are OFF")
            return Guard()
        self.store = self._open_store()
        if s.unsafe_fail_open:
            log.warning("unsafe_fail_open: requests are admitted UNCHECKED when the store is down")
        with startup_step(s, "state_store", fix=STORE_FIX):
            pow_key = _pow_key(self.store)
        return Guard(
            quota=QuotaGuard(limits, self.store, Challenges(pow_key, self.store)),
            store_deadline_s=s.state_store_deadline_s,
        )

    def _open_store(self) -> StateStore:
        s = self.settings
        with startup_step(s, "state_store", fix=STORE_FIX):
            return open_store(
                s.state_store, prefix=s.state_store_prefix, unsafe_fail_open=s.unsafe_fail_open
            )

    async def start(self) -> int:
        """Load models, bind, start serving. Returns the bound port.

        Raises ConfigError for a bad repository, model or TLS file.
        """
        s = self.settings
        if self.authenticator is not None:
            with startup_step(s, "auth.issuers"):
                self.authenticator.start()
        else:
            log.warning("authentication is OFF (unsafe_disable_auth): anyone may call every RPC")
        with startup_step(s, "model_repository", fix=REPOSITORY_FIX):
            entries = (
                self._entries
                if self._entries is not None
                else scan_repository(s.model_repository, keys=self.keys)
            )
            # What will be served, measured before anything is decrypted: encrypted models'
            # digests come from their headers, and decryption refuses any other plaintext.
            measured = measure_entries(entries)
        if not s.unsafe_plaintext:
            if s.tls_cert_file is not None and s.tls_key_file is not None:
                with startup_step(s, "tls_cert_file"):
                    self.tls = TlsIdentity.from_files(s.tls_cert_file, s.tls_key_file)
            else:
                self.tls = TlsIdentity.generate(hostnames=ATTESTED_TLS_NAMES)
        code = code_digest()
        with startup_step(s, "attestation_platform"):
            self.platform = select_platform(s, code)
        defense = s.defense_config()
        if defense is not None:
            # Sealed secrets before key release: the evidence names the audit key.
            with startup_step(s, "defense"):
                self.defense_secrets = DefenseSecrets.open(defense, self.platform)
        # Keys made at first start go beside the manifest, not in it, so that
        # `sealserve measure` reproduces the manifest from a build and a config.
        self.runtime_keys = runtime_keys_for(self.defense_secrets)
        self.manifest = build_manifest(
            s,
            measured,
            code=code,
            hardening=self._hardening_json(),
            runtime=runtime_json(s, real_platform=is_real_platform(self.platform)),
            token_keys=self.authenticator.attested_keys() if self.authenticator else {},
        )
        services = [INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME]
        # Every service registered through `protected` checks bearer tokens and scopes
        # (health, attestation and, when configured, liveness stay public: a client
        # verifies first) and answers undecodable bodies INVALID_ARGUMENT.
        inference = InferenceServicer(self.plane, self.metrics)
        protected = AuthenticatingRegistrar(
            self._server, self.authenticator, self.metrics,
            public_liveness=s.public_liveness,
            # ModelInfer refuses a recently refused account before reading its body.
            before_body={MODEL_INFER: inference.before_body},
        )  # fmt: skip
        attestation: AttestationServicer | None = None
        if self.platform is not None and self.tls is not None:
            attestation = AttestationServicer(
                self.platform,
                tls_spki=self.tls.spki_der,
                manifest=self.manifest.to_bytes(),
                hpke_public_key=self.hpke_public_key,
                runtime_keys=self.runtime_keys.to_bytes(),
                per_peer_per_minute=s.evidence_per_peer_per_minute,
                audit_head=self.audit_head,
            )
            attestation_pb2_grpc.add_AttestationServicer_to_server(attestation, protected)
            services.append(ATTESTATION_SERVICE)
            log.info(
                "attestation: %s platform, manifest sha256 %s",
                self.platform.kind.value,
                self.manifest.digest().hex(),
            )
        elif self.platform is not None:
            log.warning("attestation is off: it binds the TLS key, and TLS is off")
        with startup_step(s, "key_broker"):
            self.keys.check()
        self.keys.bind(
            platform=self.platform if self.tls is not None else None,
            tls_spki=self.tls.spki_der if self.tls is not None else b"",
            manifest=self.manifest.to_bytes(),
            hpke_private_key=self.hpke_private_key,
            runtime_keys=self.runtime_keys.to_bytes(),
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(inference, protected)
        admin = AdminServicer(self.plane.guard.quota, self.plane.guard, audit=self._audit_log)
        admin_pb2_grpc.add_AdminServicer_to_server(admin, protected)
        services.append(ADMIN_SERVICE)
        audit_pb2_grpc.add_AuditServicer_to_server(AuditServicer(self.audit_head), protected)
        services.append(AUDIT_SERVICE)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, protected)
        _ensure_health_in_pool()
        reflection.enable_server_reflection(services, self._server, pool=POOL)
        address = f"{s.host}:{s.port}"
        if self.tls is None:
            log.warning("TLS is OFF (unsafe_plaintext): requests and tokens travel in clear text")
            self.port = _bind(s, "port", address, self._server.add_insecure_port)
        else:
            creds = grpc.ssl_server_credentials([(self.tls.key_pem, self.tls.cert_pem)])
            self.port = _bind(s, "port", address, lambda a: self._server.add_secure_port(a, creds))
        await self._server.start()
        if s.rest is not None:
            await self._start_rest(s.rest, attestation)
        if s.health_port is not None:
            # Health only, plaintext: it carries no data and no credentials.
            self._health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            try:
                self.health_port = _bind(
                    s, "health_port", f"{s.health_host}:{s.health_port}",
                    self._health_server.add_insecure_port,
                )  # fmt: skip
            except ConfigError:
                await self._server.stop(0)
                raise
            await self._health_server.start()
        for name in ("", INFERENCE_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        # Keys may come from the broker (retries with backoff) and decryption is CPU
        # work: load off the event loop, while health answers NOT_SERVING.
        loop = asyncio.get_running_loop()
        try:
            with startup_step(s, "model_repository", fix=REPOSITORY_FIX):
                await loop.run_in_executor(None, self.engine.load, entries, measured)
            if defense is not None:
                assert self.defense_secrets is not None
                if self.store is None and any(m.detection for m in defense.models.values()):
                    self.store = self._open_store()
                with startup_step(s, "defense"):
                    self.plane.guard.output = build_defenses(
                        defense, self.defense_secrets, engine=self.engine, store=self.store,
                        quota=self.plane.guard.quota,
                    )  # fmt: skip
                self.plane.guard.store_io = self.store is not None and self.store.blocking
        except BaseException:
            self.keys.stop()  # a key wait in progress ends with the server
            await self._server.stop(0)
            if self.rest is not None:
                await self.rest.stop(0)
            if self._health_server is not None:
                await self._health_server.stop(0)
            raise
        self.plane.set_ready(True)
        for name in ("", INFERENCE_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if s.metrics_port is not None:
            self.metrics.serve(host=s.metrics_host, port=s.metrics_port)
        log.info(
            "serving %d model version(s) on %s:%d (%s)",
            len(entries),
            s.host,
            self.port,
            "plaintext" if self.tls is None else f"TLS, spki sha256 {self.tls.spki_sha256}",
        )
        return self.port

    async def _start_rest(
        self, rest: RestSettings, attestation: AttestationServicer | None
    ) -> None:
        """The OIP REST port: the same plane, authenticator, metrics and TLS identity."""
        app = RestApp(
            self.plane, self.metrics, authenticator=self.authenticator,
            evidence=attestation.evidence if attestation is not None else None,
            evidence_rate=attestation.check_rate if attestation is not None else None,
            max_json_bytes=rest.max_json_bytes,
        )  # fmt: skip
        self.rest = RestServer(
            app, host=rest.host, port=rest.port, tls=self.tls,
            header_timeout_s=rest.header_timeout_s, body_timeout_s=rest.body_timeout_s,
            keep_alive_s=rest.keep_alive_s,
            max_connections=rest.max_connections,
        )  # fmt: skip
        try:
            self.rest_port = await self.rest.start()
        except BaseException:
            await self._server.stop(0)
            raise

    def _audit_log(self) -> AuditLog | None:
        output = self.plane.guard.output
        return output.audit if output is not None else None

    def audit_head(self, nonce: bytes) -> bytes | None:
        """The audit log's head signed for ``nonce`` (JSON), or None without a log."""
        audit = self._audit_log()
        return None if audit is None else sign_head(audit, nonce=nonce).to_json()

    def _hardening_json(self) -> dict[str, str]:
        # Outcomes only (not details), so an auditor can predict them: see
        # server.manifest.EXPECTED_HARDENING.
        if self.hardening is None:
            return {}
        return {step.name: step.status for step in self.hardening.steps}

    async def wait(self) -> None:
        await self._server.wait_for_termination()

    async def stop(self, grace: float = 5.0) -> None:
        self.keys.stop()
        self.plane.set_ready(False)
        await self.health.enter_graceful_shutdown()
        if self.rest is not None:
            await self.rest.stop(grace)
        await self._server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        self.engine.close()
        if self.defense_secrets is not None:
            self.defense_secrets.close()  # the last ledger save is recorded in the log
        audit = self._audit_log()
        if audit is not None:
            audit.close()
        if self.store is not None:
            self.store.close()
        if self.authenticator is not None:
            self.authenticator.close()

    def write_ready_file(self, path: Path) -> None:
        """Write {host, port, tls certificate} for local tools and tests (no secrets)."""
        data = {
            "host": self.settings.host,
            "port": self.port,
            "rest_port": self.rest_port or None,
            "tls_cert_pem": self.tls.cert_pem.decode() if self.tls else None,
            "pid": os.getpid(),
        }
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)


async def serve(settings: Settings, *, ready_file: Path | None = None) -> None:
    """Harden the process, run a server until SIGINT/SIGTERM, then stop gracefully."""
    report = None
    if settings.harden_process:
        report = harden_process()
        for step in report.steps:
            log.info("hardening: %s %s (%s)", step.name, step.status, step.detail)
    server = Server(settings, hardening=report)
    await server.start()
    if ready_file is not None:
        server.write_ready_file(ready_file)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(server.wait())
    await asyncio.wait([waiter, asyncio.ensure_future(stop.wait())], return_when="FIRST_COMPLETED")
    log.info("shutting down")
    await server.stop()
