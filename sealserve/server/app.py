"""The composition root: builds every server object once and wires them together.

Over 400 lines: the one composition root; each step of ``start`` is a short method,
in the order it runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path

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
from sealserve.defense.audit.chains import worker_audit_dir
from sealserve.defense.audit.head import sign_head
from sealserve.defense.audit.log import AuditLog
from sealserve.defense.config import DefenseConfig
from sealserve.defense.store.base import StateStore
from sealserve.enclave.hardening import HardeningReport, harden_process
from sealserve.enclave.manifest import ModelMeasurement, WorkloadManifest, code_digest
from sealserve.enclave.platform import Platform
from sealserve.enclave.tls import TlsIdentity
from sealserve.errors import ConfigError, UnavailableError
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
)
from sealserve.server.metrics import Metrics
from sealserve.server.model_keys import KeyProvider, KeyRelease
from sealserve.server.repository import ModelEntry, scan_repository
from sealserve.server.rest.app import RestApp
from sealserve.server.rest.server import RestServer
from sealserve.server.settings import RestSettings, Settings
from sealserve.server.startup import (
    REPOSITORY_FIX,
    bind_port,
    open_guard,
    receive_limit,
    select_platform,
    startup_step,
)

log = logging.getLogger("sealserve.server")

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
ATTESTATION_SERVICE = apb.DESCRIPTOR.services_by_name["Attestation"].full_name
MODEL_INFER = f"/{INFERENCE_SERVICE}/ModelInfer"
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
AUDIT_SERVICE = audit_pb2.DESCRIPTOR.services_by_name["Audit"].full_name
# Names in the in-memory certificate. Attested clients pin the certificate itself and
# connect with the fixed name ``sealserve.attested``, whatever host they dialled.
ATTESTED_TLS_NAMES = ("sealserve.attested", "localhost", "127.0.0.1", "::1")


def _ensure_health_in_pool() -> None:
    # Reflection answers from our private pool; give it the health service too.
    try:
        POOL.FindFileByName(health_pb2.DESCRIPTOR.name)
    except KeyError:
        POOL.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)


def _raw_public(private_key: X25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


class Server:
    """A sealserve gRPC server. ``await start()``, then ``await wait()`` or ``stop()``.

    The constructor only keeps its arguments; ``start`` builds every object once, in
    one order: authenticator -> repository (measured) -> platform -> TLS -> sealed
    secrets -> manifest -> key provider -> guard -> data plane and services -> ports ->
    models loaded, their defenses armed -> serving.
    """

    # Built by start(), in this order.
    authenticator: Authenticator | None
    platform: Platform | None
    tls: TlsIdentity | None
    defense_secrets: DefenseSecrets | None
    manifest: WorkloadManifest
    runtime_keys: RuntimeKeys
    keys: KeyProvider
    hpke_public_key: bytes
    store: StateStore | None
    plane: DataPlane

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
        self._entries = entries
        self._measured: list[ModelMeasurement] = []
        #: The worker's index (1-based) when forked by server/workers.py, else None.
        self.worker: int | None = None
        self._given_authenticator = authenticator
        self.metrics = Metrics()
        self.engine = Engine(self.metrics, threads=settings.engine.intra_op_threads)
        self.health = health.aio.HealthServicer()
        self.defense_secrets = None
        self.store = None
        self.port = self.health_port = self.rest_port = 0
        self.metrics_port: int | None = None
        self.rest: RestServer | None = None
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Build everything in order, bind, load the models, serve. Returns the port.

        Raises ConfigError (naming the config file and key) for a bad repository,
        model, TLS file, store, platform or port.
        """
        self.prepare()
        return await self.start_prepared()

    def prepare(self, *, fork: bool = False) -> None:
        """The first half of the one order: the attested identity (authenticator,
        measured repository, platform, TLS key, sealed defense secrets, manifest, the
        key-release key). It creates no gRPC object, store connection or onnxruntime
        session, and its only threads are the authenticator's key refreshes, which
        :meth:`before_fork` stops: workers fork after it (server/workers.py).

        ``fork``: workers follow, so onnxruntime (which starts threads when imported)
        is not imported here; each worker checks its runtime record against the
        manifest's once it has (:meth:`start_prepared`)."""
        if not fork:
            # Loaded before the runtime record is measured, like every module that runs.
            import onnxruntime  # noqa: F401
        self.authenticator = self._start_authenticator()
        self._entries, self._measured = self._scan()
        code = code_digest()
        with startup_step(self.settings, "attestation_platform"):
            self.platform = select_platform(self.settings, code)
        self.tls = self._tls()
        self.defense_secrets = self._open_secrets(self.settings.defense)
        # Keys made at first start go beside the manifest, not in it, so that
        # `sealserve measure` reproduces the manifest from a build and a config.
        self.runtime_keys = runtime_keys_for(self.defense_secrets)
        self.manifest = self._build_manifest(self._measured, code)
        self.keys, hpke_private_key = self._key_provider()
        self.hpke_public_key = _raw_public(hpke_private_key)

    def before_fork(self) -> None:
        """Stop the threads :meth:`prepare` started (the authenticator's refreshes)."""
        if self.authenticator is not None:
            self.authenticator.close()

    def become_worker(self, index: int) -> None:
        """In forked worker ``index`` (1-based): its own authenticator (fresh refresh
        threads, same keys), its own audit chain (``worker-K/``) and sealed ledger file:
        one writer per file."""
        self.worker = index
        if self.authenticator is not None:
            self._given_authenticator = None
            self.authenticator = self._start_authenticator()
        if self.defense_secrets is not None:
            self.defense_secrets = self.defense_secrets.for_worker(index)

    async def start_prepared(self) -> int:
        """The second half, after :meth:`prepare` (in each worker, after the fork):
        guard and store, data plane, services, ports, models loaded, serving."""
        entries, measured, defense = self._entries, self._measured, self.settings.defense
        assert entries is not None, "prepare() first"
        if self.worker is not None:
            self._check_runtime()
        guard, self.store = open_guard(self.settings, defense)
        self.plane = DataPlane(
            self.engine, server_name=self.settings.server_name,
            max_request_bytes=self.settings.max_request_bytes, guard=guard,
        )  # fmt: skip
        attestation = self._add_services()
        await self._listen(attestation)
        await self._load(entries, measured, defense)
        log.info("serving %d model version(s) on %s:%d (%s)%s", len(entries),
                 self.settings.host, self.port, "plaintext" if self.tls is None
                 else f"TLS, spki sha256 {self.tls.spki_sha256}",
                 "" if self.worker is None else f", worker {self.worker}")  # fmt: skip
        return self.port

    def _check_runtime(self) -> None:
        """In a worker, with onnxruntime now imported: this process's runtime record must
        be the one the parent measured into the manifest (a modified module file the
        parent had not loaded would otherwise run unattested). Raises ConfigError."""
        import onnxruntime  # noqa: F401

        s = self.settings
        record = runtime_json(s, real_platform=is_real_platform(self.platform))
        if record != self.manifest.runtime:
            changed = sorted(k for k in record if record[k] != self.manifest.runtime.get(k))
            raise ConfigError(
                f"worker {self.worker}: the runtime record differs from the attested "
                f"manifest's in {', '.join(changed)}",
                remedy="Run the server from an unmodified installation (sealserve measure "
                "shows the record), or with workers = 1.",
            )

    def _start_authenticator(self) -> Authenticator | None:
        """The bearer-token verifier, its keys fetched (None: unsafe_disable_auth)."""
        s, authenticator = self.settings, self._given_authenticator
        if authenticator is None and not s.unsafe_disable_auth:
            auth = s.auth
            assert auth is not None  # Settings guarantees auth or the unsafe flag
            with startup_step(s, "auth"):
                revocation = (
                    FileRevocationList(auth.revocation_file) if auth.revocation_file else None
                )
                authenticator = Authenticator.from_settings(auth, revocation=revocation)
        if authenticator is None:
            log.warning("authentication is OFF (unsafe_disable_auth): anyone may call every RPC")
            return None
        with startup_step(s, "auth.issuers"):
            authenticator.start()
        return authenticator

    def _scan(self) -> tuple[list[ModelEntry], list[ModelMeasurement]]:
        """What will be served, measured before anything is decrypted: encrypted
        models' digests come from their headers, and decryption refuses any other
        plaintext."""
        with startup_step(self.settings, "model_repository", fix=REPOSITORY_FIX):
            entries = self._entries
            if entries is None:
                entries = scan_repository(self.settings.model_repository)
            return entries, measure_entries(entries)

    def _tls(self) -> TlsIdentity | None:
        s = self.settings
        if s.unsafe_plaintext:
            return None
        if s.tls_cert_file is not None and s.tls_key_file is not None:
            with startup_step(s, "tls_cert_file"):
                return TlsIdentity.from_files(s.tls_cert_file, s.tls_key_file)
        return TlsIdentity.generate(hostnames=ATTESTED_TLS_NAMES)

    def _open_secrets(self, defense: DefenseConfig | None) -> DefenseSecrets | None:
        """The sealed defense secrets (before key release: the evidence names the audit
        key, in the runtime keys record)."""
        if defense is None:
            return None
        with startup_step(self.settings, "defense"):
            return DefenseSecrets.open(defense, self.platform)

    def _build_manifest(self, measured: list[ModelMeasurement], code: str) -> WorkloadManifest:
        s = self.settings
        return build_manifest(
            s, measured, code=code, hardening=self._hardening_json(),
            runtime=runtime_json(s, real_platform=is_real_platform(self.platform)),
            token_keys=self.authenticator.attested_keys() if self.authenticator else {},
        )  # fmt: skip

    def _key_provider(self) -> tuple[KeyProvider, X25519PrivateKey]:
        """Model keys, and the enclave's key-release key that brokers seal them to
        (HPKE, X25519): released only when the evidence can bind it (platform + TLS).
        Raises ConfigError naming ``key_broker`` when its ca_file cannot be read."""
        hpke_private_key = X25519PrivateKey.generate()
        release = None
        if self.platform is not None and self.tls is not None:
            release = KeyRelease(
                self.platform, tls_spki=self.tls.spki_der, manifest=self.manifest.to_bytes(),
                hpke_private_key=hpke_private_key, runtime_keys=self.runtime_keys.to_bytes(),
            )  # fmt: skip
        keys = KeyProvider(broker=self.settings.key_broker, release=release)
        with startup_step(self.settings, "key_broker"):
            keys.check()
        return keys, hpke_private_key

    def _add_services(self) -> AttestationServicer | None:
        """The gRPC server and its services; every one registered through ``protected``
        checks bearer tokens and scopes (health, attestation and, when configured,
        liveness stay public: a client verifies first) and answers undecodable bodies
        INVALID_ARGUMENT. Returns the attestation service (None: not served)."""
        # gRPC refuses a message before reading it only with its own RESOURCE_EXHAUSTED;
        # its limit sits at twice the cap (plus framing) so that every request up to
        # there reaches the codec and gets INVALID_ARGUMENT with the documented message.
        limit = receive_limit(self.settings.max_request_bytes)
        self._server = server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # Workers share the port (SO_REUSEPORT); one server alone refuses a taken one.
            ("grpc.so_reuseport", 0 if self.worker is None else 1),
        ])  # fmt: skip
        inference = InferenceServicer(self.plane, self.metrics)
        protected = AuthenticatingRegistrar(
            server, self.authenticator, self.metrics,
            public_liveness=self.settings.public_liveness,
            # ModelInfer refuses a recently refused account before reading its body.
            before_body={MODEL_INFER: inference.before_body},
        )  # fmt: skip
        attestation = self._attestation_servicer()
        services = [INFERENCE_SERVICE, ADMIN_SERVICE, AUDIT_SERVICE]
        if attestation is not None:
            attestation_pb2_grpc.add_AttestationServicer_to_server(attestation, protected)
            services.append(ATTESTATION_SERVICE)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(inference, protected)
        guard = self.plane.guard
        admin = AdminServicer(guard.quota, guard, audit=self._audit_log)
        admin_pb2_grpc.add_AdminServicer_to_server(admin, protected)
        audit_pb2_grpc.add_AuditServicer_to_server(AuditServicer(self.audit_head), protected)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, protected)
        _ensure_health_in_pool()
        services += [health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(services, server, pool=POOL)
        return attestation

    def _attestation_servicer(self) -> AttestationServicer | None:
        """GetEvidence, when there is a platform and a TLS key for it to bind."""
        if self.platform is None:
            return None
        if self.tls is None:
            log.warning("attestation is off: it binds the TLS key, and TLS is off")
            return None
        log.info("attestation: %s platform, manifest sha256 %s", self.platform.kind.value,
                 self.manifest.digest().hex())  # fmt: skip
        return AttestationServicer(
            self.platform, tls_spki=self.tls.spki_der, manifest=self.manifest.to_bytes(),
            hpke_public_key=self.hpke_public_key, runtime_keys=self.runtime_keys.to_bytes(),
            per_peer_per_minute=self.settings.evidence_per_peer_per_minute,
            audit_head=self.audit_head,
        )  # fmt: skip

    async def _listen(self, attestation: AttestationServicer | None) -> None:
        """Bind and start the gRPC port, then the REST and health ports; health says
        NOT_SERVING until the models have loaded."""
        s, server = self.settings, self._server
        assert server is not None
        address = f"{s.host}:{s.port}"
        if self.tls is None:
            log.warning("TLS is OFF (unsafe_plaintext): requests and tokens travel in clear text")
            self.port = bind_port(s, "port", address, server.add_insecure_port)
        else:
            creds = grpc.ssl_server_credentials([(self.tls.key_pem, self.tls.cert_pem)])
            self.port = bind_port(s, "port", address, lambda a: server.add_secure_port(a, creds))
        await server.start()
        try:
            if s.rest is not None:
                await self._start_rest(s.rest, attestation)
            if s.health_port is not None:
                await self._start_health_port()
        except BaseException:
            await self._stop_ports()
            raise
        for name in ("", INFERENCE_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _start_health_port(self) -> None:
        # Health only, plaintext: it carries no data and no credentials.
        s = self.settings
        self._health_server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0 if self.worker is None else 1)]
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
        add = self._health_server.add_insecure_port
        self.health_port = bind_port(s, "health_port", f"{s.health_host}:{s.health_port}", add)
        await self._health_server.start()

    async def _load(
        self, entries: list[ModelEntry], measured: list[ModelMeasurement],
        defense: DefenseConfig | None,
    ) -> None:  # fmt: skip
        """Load the models off the event loop (keys may come from the broker, with
        retries; decryption is CPU work), build their output defenses, then serve."""
        s = self.settings
        try:
            with startup_step(s, "model_repository", fix=REPOSITORY_FIX):
                await asyncio.get_running_loop().run_in_executor(
                    None, self.engine.load, entries, measured, self.keys
                )
            output = None
            if defense is not None:
                assert self.defense_secrets is not None
                with startup_step(s, "defense"):
                    output = build_defenses(
                        defense, self.defense_secrets, engine=self.engine, store=self.store,
                        quota=self.plane.guard.quota,
                        audit_dir=worker_audit_dir(defense.audit.dir, self.worker),
                    )  # fmt: skip
        except BaseException:
            self.keys.stop()  # a key wait in progress ends with the server
            await self._stop_ports()
            raise
        self.plane.open(output)
        if output is not None:
            cohort, worker = output.cohort, output.worker
            self.metrics.watch_defenses(
                (lambda: cohort.alerts) if cohort is not None else (lambda: 0),
                (lambda: worker.queued_rows) if worker is not None else None,
            )
        for name in ("", INFERENCE_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if s.metrics_port is not None:
            if self.worker is None:
                self.metrics_port = self.metrics.serve(host=s.metrics_host, port=s.metrics_port)
            else:
                # A worker serves its own series on a loopback port the parent reads; the
                # parent's metrics_port shows them all, labelled worker (workers.py).
                self.metrics_port = self.metrics.serve(host="127.0.0.1", port=0)

    async def _stop_ports(self, grace: float | None = 0) -> None:
        if self.rest is not None:
            await self.rest.stop(grace or 0)
        if self._server is not None:
            await self._server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)

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
            max_connections=rest.max_connections, reuse_port=self.worker is not None,
        )  # fmt: skip
        self.rest_port = await self.rest.start()

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
        assert self._server is not None, "start() first"
        await self._server.wait_for_termination()

    async def stop(self, grace: float = 5.0) -> None:
        self.keys.stop()
        self.plane.close()
        await self.health.enter_graceful_shutdown()
        await self._stop_ports(grace)
        self.engine.close()
        output = self.plane.guard.output
        if output is not None:
            output.close()  # detectors' state still in process goes to the store
        if self.defense_secrets is not None:
            self.defense_secrets.close()  # the last ledger save is recorded in the log
        audit = self._audit_log()
        if audit is not None:
            audit.close()
        quota = self.plane.guard.quota
        if quota is not None:
            try:
                quota.close()  # unused quota leases go back to the store
            except UnavailableError as exc:
                log.warning("quota leases not returned (their units stay counted): %s", exc)
        if self.store is not None:
            self.store.close()
        if self.authenticator is not None:
            self.authenticator.close()

    def write_ready_file(self, path: Path, *, workers: list[int] | None = None) -> None:
        """Write {host, port, tls certificate, pid} for local tools and tests (no
        secrets); with worker processes, ``pid`` is their parent's and ``workers`` their
        pids."""
        data: dict[str, object] = {
            "host": self.settings.host,
            "port": self.port,
            "rest_port": self.rest_port or None,
            "metrics_port": self.metrics_port,
            "tls_cert_pem": self.tls.cert_pem.decode() if self.tls else None,
            "pid": os.getpid(),
        }
        if workers is not None:
            data["workers"] = workers
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
    await run_until_stopped(server)


async def run_until_stopped(server: Server) -> None:
    """Serve until SIGINT/SIGTERM or the server ends, then stop gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(server.wait())
    await asyncio.wait([waiter, asyncio.ensure_future(stop.wait())], return_when="FIRST_COMPLETED")
    log.info("shutting down")
    await server.stop()
