"""``sealserve broker``: run the key broker, and administer its keys.

``serve --config FILE`` runs it; ``init-master-key --out FILE`` makes a master key,
``init-tls --out DIR`` a lasting TLS key and certificate;
``add-key``, ``set-policy``, ``list`` and ``revoke`` call its admin API with an admin
token (``--admin-token-file`` or ``SEALSERVE_BROKER_ADMIN_TOKEN``).
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

from sealserve.cli._broker_conn import add_connection_args, connect, read_policy
from sealserve.errors import ConfigError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "broker",
        help="run or administer the key broker",
        description=(
            "The key broker holds model data keys (sealed at rest under a master key) and "
            "releases one, HPKE-sealed, only to an enclave whose attestation evidence "
            "meets that key's policy. See docs/key-broker.md."
        ),
    )
    sub = parser.add_subparsers(dest="broker_command", metavar="ACTION", required=True)

    p = sub.add_parser("serve", help="run the key broker")
    p.add_argument("--config", type=Path, required=True, help="broker settings (TOML)")
    p.add_argument("--port", type=int, help="override 'port' (0 picks a free port)")
    p.add_argument(
        "--ready-file", type=Path, help="write {host, port, tls_cert_pem, pid} as JSON once up"
    )
    p.set_defaults(func=_serve)

    p = sub.add_parser("init-master-key", help="write a new random master key (mode 0600)")
    p.add_argument("--out", type=Path, required=True, help="the key file to create")
    p.set_defaults(func=_init_master_key)

    p = sub.add_parser(
        "init-tls",
        help="write a lasting TLS key (0600) and certificate for the broker",
        description="Write broker-key.pem (mode 0600) and its self-signed certificate "
        "broker-cert.pem into DIR. Name them in broker.toml (tls_key_file, tls_cert_file) "
        "and give the certificate to servers as [key_broker] ca_file: it survives "
        "restarts, unlike the in-memory default.",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to write")
    p.add_argument(
        "--hostname",
        action="append",
        metavar="NAME",
        help="DNS name or IP address servers reach the broker by (repeatable; default: "
        "localhost and 127.0.0.1)",
    )
    p.add_argument(
        "--days", type=int, default=365, help="validity of the certificate (default: 365)"
    )
    p.set_defaults(func=_init_tls)

    p = sub.add_parser("add-key", help="deposit a data key from a key file")
    p.add_argument("key_id", help="the key id (as in the encrypted model's header)")
    p.add_argument("--key-file", type=Path, required=True, help="a sealserve key file")
    _policy_args(p)
    add_connection_args(p, required=True)
    p.set_defaults(func=_add_key)

    p = sub.add_parser("set-policy", help="replace a key's release policy")
    p.add_argument("key_id", help="the key id (as in the encrypted model's header)")
    _policy_args(p, required=True)
    add_connection_args(p, required=True)
    p.set_defaults(func=_set_policy)

    p = sub.add_parser("list", help="list key ids, their policies and roots")
    add_connection_args(p, required=True)
    p.set_defaults(func=_list)

    p = sub.add_parser("revoke", help="erase a key at the broker for good")
    p.add_argument("key_id", help="the key id (as in the encrypted model's header)")
    add_connection_args(p, required=True)
    p.set_defaults(func=_revoke)


def _policy_args(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    p.add_argument(
        "--policy",
        type=Path,
        required=required,
        help="release policy (attestation policy TOML, docs/attestation-policy.md)",
    )
    p.add_argument(
        "--root",
        action="append",
        default=[],
        choices=("amd", "intel", "unsafe-simulated"),
        help="trusted root for this key (repeatable, no default): amd for sev-snp, intel "
        "for tdx, 'unsafe-simulated' for the simulated platform (needs the broker's "
        "unsafe_simulated_root_dir: development only)",
    )
    p.add_argument(
        "--unsafe-allow-incomplete-policy",
        action="store_true",
        help="UNSAFE: accept a policy that names no platform, no trusted root or no launch "
        "measurement (such a key may be released to any guest of that platform)",
    )


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import os

    from sealserve.broker.app import BrokerServer
    from sealserve.broker.settings import BrokerSettings
    from sealserve.server.logs import configure

    overrides: dict[str, Any] = {}
    if args.port is not None:
        overrides["port"] = args.port
    settings = BrokerSettings.load(args.config, **overrides)
    configure(settings.log_format, settings.log_level)

    async def main() -> None:
        server = BrokerServer(settings)
        await server.start()
        if args.ready_file is not None:
            info = {
                "host": settings.host,
                "port": server.port,
                "tls_cert_pem": server.cert_pem.decode(),
                "pid": os.getpid(),
            }
            tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
            tmp.write_text(json.dumps(info))
            os.replace(tmp, args.ready_file)
        # SIGTERM/SIGINT stop the broker gracefully (exit 0), like `sealserve serve`.
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        waiter = asyncio.ensure_future(server.wait())
        try:
            await asyncio.wait(
                [waiter, asyncio.ensure_future(stop.wait())], return_when="FIRST_COMPLETED"
            )
        finally:
            await server.stop()

    asyncio.run(main())
    return 0


def _init_master_key(args: argparse.Namespace) -> int:
    import os
    import secrets

    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot create {args.out}: {exc.strerror}") from exc
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    print(f"master key: written to {args.out} (mode 0600); keep it private and backed up")
    return 0


def _init_tls(args: argparse.Namespace) -> int:
    from sealserve.broker.tls import init_identity

    if not 1 <= args.days <= 3650:
        raise ConfigError(f"--days {args.days}: give 1 to 3650")
    hostnames = tuple(args.hostname or ("localhost", "127.0.0.1"))
    cert, key = init_identity(args.out, hostnames=hostnames, days=args.days)
    print(f"broker TLS key:         {key} (mode 0600; keep it private, back it up)")
    print(f"broker TLS certificate: {cert} (for {', '.join(hostnames)}, {args.days} days)")
    print(f'broker.toml:            tls_cert_file = "{cert}", tls_key_file = "{key}"')
    print(f'servers:                [key_broker] ca_file = "{cert}"')
    return 0


def _add_key(args: argparse.Namespace) -> int:
    from sealserve.enclave.key_file import KeyFile

    key = KeyFile.read(args.key_file)
    if key.key_id != args.key_id:
        raise ConfigError(f"{args.key_file} holds key id {key.key_id!r}, not {args.key_id!r}")
    policy = read_policy(args.policy)
    with connect(args) as admin:
        admin.add_key(
            args.key_id,
            key.key,
            policy_toml=policy,
            roots=args.root,
            unsafe_allow_incomplete_policy=args.unsafe_allow_incomplete_policy,
        )
    print(f"key {args.key_id!r} deposited" + ("" if policy else " (no policy yet: never released)"))
    return 0


def _set_policy(args: argparse.Namespace) -> int:
    policy = read_policy(args.policy)
    with connect(args) as admin:
        admin.set_policy(
            args.key_id,
            policy,
            roots=args.root,
            unsafe_allow_incomplete_policy=args.unsafe_allow_incomplete_policy,
        )
    print(f"policy of key {args.key_id!r} replaced")
    return 0


def _list(args: argparse.Namespace) -> int:
    with connect(args) as admin:
        keys = admin.list_keys()
    if not keys:
        print("no keys")
    for k in keys:
        when = dt.datetime.fromtimestamp(k.updated_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        state = "REVOKED" if k.revoked else ("policy set" if k.policy_toml else "NO POLICY")
        roots = ",".join(k.roots)
        if "unsafe-simulated" in k.roots:
            roots += " (UNSAFE: simulated root)"
        print(f"{k.key_id}\t{state}\troots={roots}\tupdated={when}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    with connect(args) as admin:
        admin.revoke_key(args.key_id)
    print(f"key {args.key_id!r} revoked (erased at the broker)")
    return 0
