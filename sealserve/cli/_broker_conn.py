"""Options shared by the commands that talk to the key broker's admin API."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from sealserve.cli._connect import refuse_secret
from sealserve.errors import ConfigError

if TYPE_CHECKING:
    from sealserve.broker.admin_client import BrokerAdmin

TOKEN_ENV = "SEALSERVE_BROKER_ADMIN_TOKEN"  # noqa: S105 (a variable name)


def add_connection_args(parser: argparse._ActionsContainer, *, required: bool) -> None:
    parser.add_argument(
        "--broker", required=required, metavar="HOST:PORT", help="the key broker's address"
    )
    parser.add_argument(
        "--broker-ca",
        type=Path,
        metavar="PEM",
        help="the broker's certificate or CA (PEM) to pin; default: system roots",
    )
    parser.add_argument(
        "--broker-server-name",
        metavar="NAME",
        help="name to check in the broker's certificate (default: the host of --broker)",
    )
    parser.add_argument(
        "--admin-token-file",
        type=Path,
        metavar="FILE",
        help=f"file holding the admin JWT (or set {TOKEN_ENV}; never on the command line)",
    )
    refuse_secret(parser, "--admin-token", instead=f"--admin-token-file FILE or ${TOKEN_ENV}")


def connect(args: argparse.Namespace) -> BrokerAdmin:
    """A BrokerAdmin from the parsed options. Raises ConfigError for missing pieces."""
    from sealserve.broker.admin_client import BrokerAdmin

    if args.admin_token_file is not None:
        try:
            token = args.admin_token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read admin token file: {exc}") from exc
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ConfigError(
            "no admin token: pass --admin-token-file FILE or set " + TOKEN_ENV,
            remedy="Issue one with `sealserve token issue --scope admin --audience "
            "sealserve-broker --tos broker-admin ...`.",
        )
    ca_pem = None
    if args.broker_ca is not None:
        try:
            ca_pem = args.broker_ca.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read --broker-ca: {exc}") from exc
    return BrokerAdmin(args.broker, token=token, ca_pem=ca_pem, server_name=args.broker_server_name)


def read_policy(path: Path | None) -> str:
    """The policy file's text, checked locally first. Raises ConfigError."""
    if path is None:
        return ""
    from sealserve.attestation.policy import load_policy

    load_policy(path)
    return path.read_text(encoding="utf-8")
