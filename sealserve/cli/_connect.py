"""Connection options shared by the commands that call a running server."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_connection_args(p: argparse.ArgumentParser, *, token: bool = True) -> None:
    g = p.add_argument_group("connection (default: attest the server with the default policy)")
    g.add_argument("--policy", type=Path, help="attestation policy file (TOML)")
    g.add_argument(
        "--simulated-root", type=Path, action="append", default=[],
        help="also trust this simulated platform root (development only)",
    )  # fmt: skip
    g.add_argument("--ca", type=Path, help="pin this PEM certificate instead of attesting")
    g.add_argument(
        "--plaintext", action="store_true", help="no TLS (only for unsafe_plaintext servers)"
    )
    if token:
        g.add_argument("--token", help="bearer token (or set --token-file)")
        g.add_argument("--token-file", type=Path, help="file holding the bearer token")


def connection_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for Client / open_channel from the parsed options."""
    from sealserve.attestation.snp_certs import TrustedRoots

    kw: dict[str, Any] = {}
    if args.plaintext:
        kw["unsafe_plaintext"] = True
    elif args.ca is not None:
        kw["root_certificates"] = args.ca.read_bytes()
    else:
        roots = TrustedRoots.vendors()
        for d in args.simulated_root:
            roots = roots + TrustedRoots.from_dir(d)
        kw["roots"] = roots
        kw["policy"] = args.policy
    return kw


def token_from(args: argparse.Namespace) -> str | None:
    if getattr(args, "token", None):
        return str(args.token)
    if getattr(args, "token_file", None) is not None:
        return str(args.token_file.read_text().strip())
    return None
