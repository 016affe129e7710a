"""Connection options shared by the commands that call a running server."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

#: Where commands that call a server look for the bearer token without --token-file.
TOKEN_ENV = "SEALSERVE_TOKEN"  # noqa: S105 (a variable name)


class RefuseSecret(argparse.Action):
    """An option that is refused: a secret given on the command line is visible to
    every user of the machine (``ps``) and stays in the shell's history. Registered
    under the names people try (``--token``) so that argparse does not take them as
    an abbreviation of ``--token-file``; the value is never repeated."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        self.instead = str(kwargs.pop("instead"))
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:  # fmt: skip
        parser.error(
            f"{option_string} is not accepted: a token on the command line is visible to "
            f"other users and kept in shell history; use {self.instead}"
        )


def refuse_secret(p: Any, *names: str, instead: str) -> None:
    """Refuse ``names`` (see :class:`RefuseSecret`), pointing at ``instead``."""
    p.add_argument(*names, action=RefuseSecret, instead=instead, dest=f"_refused_{names[0]}")


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
        # Never the token itself on the command line (other users see it in ps and
        # the shell history): a file, or the environment.
        g.add_argument(
            "--token-file", type=Path, metavar="FILE",
            help=f"file holding the bearer token (default: ${TOKEN_ENV} if set)",
        )  # fmt: skip
        refuse_secret(g, "--token", instead=f"--token-file FILE or ${TOKEN_ENV}")


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
    """The bearer token from --token-file, else $SEALSERVE_TOKEN, else None."""
    return read_token_file(getattr(args, "token_file", None), env=TOKEN_ENV)


def read_token_file(path: Path | None, *, env: str) -> str | None:
    """A token from ``path`` (one line), else from the environment variable ``env``."""
    from sealserve.errors import ConfigError

    if path is not None:
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read token file {path}: {exc.strerror}") from exc
        if not token:
            raise ConfigError(f"token file {path} is empty")
        return token
    return os.environ.get(env, "").strip() or None
