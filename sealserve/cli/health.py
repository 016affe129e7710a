"""``sealserve health``: ask a server's standard gRPC health service whether it serves.

Made for container health checks and local liveness probes: one ``grpc.health.v1``
``Check`` call, one line of output, exit 0 when the answer is SERVING and 1 otherwise
(not reachable, TLS failure, NOT_SERVING, SERVICE_UNKNOWN, timeout).

TLS: by default the certificate the server presents is accepted without verifying a
chain (it is fetched, then pinned for the one call). That is deliberate: the in-memory
certificate a server makes at start is self-signed and new on every start, so nothing
could be pinned ahead of time, and a health probe sends no token and no data -- the
worst a machine in the middle can do is lie about liveness. Clients that send data
pin the certificate through attestation instead (``sealserve.client``). Use
``--ca-file`` to verify a certificate issued by a CA, ``--plaintext`` for a server run
with ``unsafe_plaintext``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DEFAULT_TARGET = "127.0.0.1:8001"


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "health",
        help="check a server's gRPC health service (for health and liveness probes)",
        description=(
            "Calls grpc.health.v1.Health/Check on --target and prints one line. Exit 0 "
            "when the server answers SERVING, 1 otherwise. Over TLS the presented "
            "certificate is accepted without chain verification (a liveness probe sends "
            "no data; the server's in-memory certificate is self-signed) unless --ca-file "
            "is given."
        ),
    )
    p.add_argument(
        "--target", default=DEFAULT_TARGET, metavar="HOST:PORT",
        help=f"server address (default {DEFAULT_TARGET})",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    p.add_argument(
        "--service", default="", help="service name to check (default '': the whole server)"
    )
    tls = p.add_mutually_exclusive_group()
    tls.add_argument(
        "--plaintext", action="store_true", help="connect without TLS (unsafe_plaintext servers)"
    )
    tls.add_argument(
        "--ca-file", type=Path, help="verify the server certificate against this PEM CA bundle"
    )
    p.set_defaults(func=run)


def _tls_name(cert_pem: bytes) -> str | None:
    """The first DNS (else IP) subject alternative name of ``cert_pem``, if any."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    names = sans.get_values_for_type(x509.DNSName)
    names += [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    return names[0] if names else None


def _presented_certificate(target: str, timeout: float) -> bytes:
    """The certificate ``target`` presents, PEM, unverified. Raises UnavailableError.

    Not ``sealserve.client.attested.fetch_certificate``: importing the SDK pulls in
    numpy, which would triple the cost of a probe that runs every few seconds.
    """
    import ssl

    from sealserve.errors import UnavailableError

    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise UnavailableError(f"target {target!r} is not HOST:PORT")
    try:
        return ssl.get_server_certificate((host.strip("[]"), int(port)), timeout=timeout).encode()
    except (OSError, ssl.SSLError) as exc:
        raise UnavailableError(f"cannot fetch the TLS certificate of {target}: {exc}") from exc


def _channel(args: argparse.Namespace) -> Any:
    """A channel to --target as the flags ask. Raises SealserveError subclasses."""
    import grpc

    from sealserve.errors import ConfigError

    if args.plaintext:
        return grpc.insecure_channel(args.target)
    presented = _presented_certificate(args.target, args.timeout)
    if args.ca_file is not None:
        try:
            roots = args.ca_file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {args.ca_file}: {exc.strerror}") from exc
    else:
        roots = presented  # accepted as is: see the module docstring for why
    options = []
    name = _tls_name(presented)
    if name is not None:
        options.append(("grpc.ssl_target_name_override", name))
    creds = grpc.ssl_channel_credentials(root_certificates=roots)
    return grpc.secure_channel(args.target, creds, options=options)


def run(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from sealserve.errors import SealserveError

    what = args.target + (f" service {args.service!r}" if args.service else "")
    try:
        channel = _channel(args)
    except SealserveError as exc:
        print(f"UNHEALTHY {what}: {exc.message}")
        return 1
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "ERROR"
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            print(f"UNHEALTHY {what}: {code}: {detail}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    if resp.status == health_pb2.HealthCheckResponse.SERVING:
        print(f"SERVING {what}")
        return 0
    print(f"UNHEALTHY {what}: {status}")
    return 1
