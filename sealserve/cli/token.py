"""``sealserve token``: signing keys and access tokens for operators and tests.

- ``keygen --out-dir DIR [--alg ES256]``: writes ``DIR/signing-key.pem`` (mode 0600)
  and adds the public key to ``DIR/jwks.json`` (existing keys stay, for rotation).
- ``issue --key KEY.pem --issuer ISS --audience AUD --sub ACCOUNT --tier T
  --scope infer [--scope metadata] --tos VERSION --ttl 1h``: prints a token.
- ``inspect TOKEN``: prints header and claims as JSON, labelled UNVERIFIED.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from sealserve.errors import ConfigError, InputError

# sealserve.auth.principal.SCOPES, spelt out so that --help does not import the JWT stack
# (tests/cli/test_help.py checks they agree).
SCOPE_CHOICES = ("infer", "metadata", "admin", "audit")

_REMEDY = "Check the arguments against 'sealserve token --help'."


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "token",
        help="create signing keys, issue and inspect access tokens",
        description="Create signing keys, issue and inspect access tokens (JWT).",
    )
    sub = parser.add_subparsers(dest="token_command", metavar="ACTION", required=True)

    keygen = sub.add_parser("keygen", help="write a new signing key and its JWKS")
    keygen.add_argument("--out-dir", type=Path, required=True, help="directory to write into")
    keygen.add_argument(
        "--alg",
        default="ES256",
        choices=("ES256", "ES384", "EdDSA", "RS256", "PS256"),
        help="signature algorithm (default: %(default)s)",
    )
    keygen.add_argument(
        "--key-name", default="signing-key", help="private key file stem (default signing-key)"
    )
    keygen.set_defaults(func=_keygen)

    issue = sub.add_parser("issue", help="sign and print an access token")
    issue.add_argument("--key", type=Path, required=True, help="private key PEM (from keygen)")
    issue.add_argument("--issuer", required=True, help="the 'iss' claim")
    issue.add_argument("--audience", required=True, help="the 'aud' claim (the service)")
    issue.add_argument("--sub", required=True, help="the account ('sub' claim)")
    issue.add_argument("--tier", required=True, help="the account's tier")
    issue.add_argument(
        "--scope",
        action="append",
        required=True,
        choices=SCOPE_CHOICES,
        help="a granted scope (repeat for several)",
    )
    issue.add_argument("--tos", required=True, help="accepted terms-of-service version")
    issue.add_argument("--ttl", default="1h", help="lifetime: 90s, 15m, 1h, 7d (default 1h)")
    issue.add_argument("--kid", help="key id (default: the key's RFC 7638 thumbprint)")
    issue.add_argument("--jti", help="token id (default: random)")
    issue.set_defaults(func=_issue)

    inspect = sub.add_parser("inspect", help="show a token's header and claims (UNVERIFIED)")
    inspect.add_argument("value", metavar="TOKEN", help="the token, or '-' to read it from stdin")
    inspect.set_defaults(func=_inspect)


def _write_private(path: Path, data: bytes) -> None:
    # O_EXCL: never overwrite a key; 0600 from creation, not chmod'ed afterwards.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise InputError(
            f"{path} exists; refusing to overwrite a key",
            remedy="Choose another --key-name or --out-dir.",
        ) from exc
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _keygen(args: argparse.Namespace) -> int:
    from sealserve.auth.issuer import generate_keypair

    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    pem, jwks = generate_keypair(args.alg)
    jwks_path = out / "jwks.json"
    keys: list[Any] = []
    if jwks_path.exists():
        try:
            keys = list(json.loads(jwks_path.read_text())["keys"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{jwks_path} exists but is not a JWKS") from exc
    key_path = out / f"{args.key_name}.pem"
    _write_private(key_path, pem)
    keys.extend(jwks["keys"])
    tmp = jwks_path.with_name("jwks.json.tmp")
    tmp.write_text(json.dumps({"keys": keys}, indent=2) + "\n")
    tmp.replace(jwks_path)
    kid = jwks["keys"][0]["kid"]
    print(f"private key: {key_path} (keep it secret)")
    print(f"jwks:        {jwks_path} ({len(keys)} key(s))")
    print(f"kid:         {kid}")
    return 0


def _issue(args: argparse.Namespace) -> int:
    from sealserve.auth.issuer import TokenIssuer, parse_ttl

    try:
        pem = args.key.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {args.key}: {exc.strerror}", remedy=_REMEDY) from exc
    issuer = TokenIssuer.from_pem(pem, issuer=args.issuer, audience=args.audience, kid=args.kid)
    token = issuer.issue(
        args.sub,
        tier=args.tier,
        scopes=args.scope,
        tos_version=args.tos,
        ttl=parse_ttl(args.ttl),
        jti=args.jti,
    )
    print(token)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import jwt

    raw = sys.stdin.read().strip() if args.value == "-" else args.value.strip()
    if raw.lower().startswith("bearer "):
        raw = raw[7:].strip()
    try:
        header = jwt.get_unverified_header(raw)
        # Display only: nothing here is trusted, so the signature is not checked.
        claims = jwt.decode(raw, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise InputError(f"not a JWT: {exc}", remedy=_REMEDY) from exc
    print("UNVERIFIED: signature and claims were NOT checked; do not trust them.", file=sys.stderr)
    document = {
        "UNVERIFIED": "signature and claims were not checked",
        "header": header,
        "claims": claims,
    }
    print(json.dumps(document, indent=2, sort_keys=True))
    return 0
