"""``sealserve verify``: the auditor's check of an endpoint, of saved evidence, or of a
raw hardware report (``--report``, in :mod:`sealserve.cli._verify_raw`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sealserve.cli._verify_raw import add_raw_args


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "verify",
        help="verify attestation: a server, saved evidence, or a raw hardware report",
        description=(
            "Online: fetch fresh evidence from --endpoint with a random nonce over a TLS "
            "channel pinned to the server's certificate, verify it against --policy, and "
            "check that the TLS key is the one the evidence binds. Offline: verify saved "
            "--evidence (freshness cannot be checked offline). Raw: verify a --report "
            "someone handed you (SEV-SNP report, Azure HCL report, TDX quote) with its "
            "certificates or collateral, at --at. Prints every check and claim; exits 0 "
            "only if all pass."
        ),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--endpoint", metavar="HOST:PORT", help="server to attest")
    src.add_argument("--evidence", type=Path, help="evidence saved with --save")
    src.add_argument("--report", type=Path, help="a raw SEV-SNP report, HCL report or TDX quote")
    p.add_argument(
        "--at", metavar="TIME",
        help="verify as of this ISO 8601 time (offline modes; default: now)",
    )  # fmt: skip
    p.add_argument("--policy", type=Path, help="policy file (TOML); default policy if omitted")
    p.add_argument(
        "--simulated-root",
        type=Path,
        action="append",
        default=[],
        help="also trust this simulated platform root (development only)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.add_argument("--save", type=Path, help="write the evidence here (online mode)")
    p.add_argument(
        "--audit-key-out", type=Path, metavar="FILE",
        help="once verified, write the attested audit public key (PEM) here, for "
        "`sealserve audit verify --public-key FILE`",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for --endpoint (default: %(default)s)")  # fmt: skip
    add_raw_args(p)
    p.set_defaults(func=run)


def _roots(simulated: list[Path]) -> Any:
    from sealserve.attestation.snp_certs import TrustedRoots

    roots = TrustedRoots.vendors()
    for d in simulated:
        roots = roots + TrustedRoots.from_dir(d)
    return roots


def run(args: argparse.Namespace) -> int:
    from sealserve.attestation.evidence import Evidence, verify_evidence_at_time
    from sealserve.cli._verify_raw import claims_dict, parse_time, verify_raw
    from sealserve.client.attested import attest, resolve_policy
    from sealserve.errors import AttestationError, ConfigError, PolicyError

    policy = resolve_policy(args.policy)
    roots = _roots(args.simulated_root)
    mode = "online" if args.endpoint else "raw" if args.report else "offline"
    report: dict[str, Any] = {"ok": False, "mode": mode}
    evidence = None
    passed: list[Any] = []
    extra: list[tuple[str, bool | None, str]] = []
    try:
        if args.report:
            claims, passed = verify_raw(args, policy=policy, roots=roots)
            report["claims"] = claims_dict(claims)
            policy.verify(claims)
            extra = [("policy", True, type(policy).__name__)]
        elif args.endpoint:
            endpoint = attest(args.endpoint, policy=policy, roots=roots, timeout=args.timeout)
            evidence, claims = endpoint.evidence, endpoint.claims
            extra = [("tls_binding", True, "channel TLS key == key bound in evidence")]
        else:
            try:
                evidence = Evidence.from_bytes(args.evidence.read_bytes())
            except OSError as exc:
                raise ConfigError(f"cannot read {args.evidence}: {exc.strerror}") from exc
            claims = verify_evidence_at_time(
                evidence,
                policy=policy,
                roots=roots,
                expected_nonce=evidence.nonce,
                now=parse_time(args.at),
            )
            extra = [("freshness", None, "not checked offline: nonce taken from the file")]
        if claims.runtime_keys is not None:
            report["runtime_keys"] = claims.runtime_keys.to_json()
            _write_audit_key(args.audit_key_out, claims.runtime_keys)
        report["ok"] = True
        report["checks"] = [
            {"name": c.name, "passed": c.passed, "detail": c.detail}
            for c in (*passed[:1], *claims.checks, *passed[1:])
        ] + [{"name": n, "passed": ok, "detail": d} for n, ok, d in extra]
        report["claims"] = claims_dict(claims)
    except AttestationError as exc:
        check = exc.check or ("policy" if isinstance(exc, PolicyError) else "verification")
        report["error"] = {"check": check, "message": exc.message}
        if "claims" in report:  # verified, refused by the policy: show what was verified
            report["checks"] = [
                {"name": c.name, "passed": c.passed, "detail": c.detail}
                for c in (*passed[:1], *claims.checks, *passed[1:])
            ]
    finally:
        if args.save and evidence is not None:
            args.save.write_bytes(evidence.to_bytes())
    if evidence is not None:
        report["manifest"] = json.loads(evidence.manifest) if evidence.manifest else None
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_table(report)
    return 0 if report["ok"] else 1


def _write_audit_key(path: Path | None, keys: Any) -> None:
    """Write the verified audit public key as PEM (ConfigError without one)."""
    if path is None:
        return
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from sealserve.errors import ConfigError

    if keys.audit_public_key is None:
        raise ConfigError(
            "--audit-key-out: the attested server holds no audit key (no [defense] audit "
            "log), so there is none to write"
        )
    pem = Ed25519PublicKey.from_public_bytes(keys.audit_public_key).public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
    )
    path.write_bytes(pem)


def _print_table(report: dict[str, Any]) -> None:
    out = sys.stdout
    claims = report.get("claims")
    if claims and claims["simulated"]:
        print("!! SIMULATED evidence: this is not a real TEE (development only) !!", file=out)
    print(f"{'check':<24} {'result':<6} detail", file=out)
    print(f"{'-' * 24} {'-' * 6} {'-' * 40}", file=out)
    for c in report.get("checks", []):
        mark = {True: "PASS", False: "FAIL", None: "info"}[c["passed"]]
        print(f"{c['name']:<24} {mark:<6} {c['detail']}", file=out)
    if "error" in report:
        err = report["error"]
        print(f"{err['check'] or 'verification':<24} {'FAIL':<6} {err['message']}", file=out)
    if claims is not None:
        _print_claims(report, claims)
    print("\nresult: " + ("REJECTED" if "error" in report else "VERIFIED"), file=out)


def _print_claims(report: dict[str, Any], claims: dict[str, Any]) -> None:
    out = sys.stdout
    print("\nclaims:", file=out)
    print(f"  platform         {claims['platform']}", file=out)
    print(f"  debug            {claims['debug']}", file=out)
    for reg, value in claims["measurements"].items():
        print(f"  {reg:<16} {value}", file=out)
    print(f"  manifest sha256  {claims['manifest_digest']}", file=out)
    for key, value in claims["fields"].items():
        if key not in claims["measurements"]:
            print(f"  {key:<16} {value}", file=out)
    audit = (report.get("runtime_keys") or {}).get("audit")
    if audit:
        print(f"  audit pubkey     {audit['public_key']} (attested runtime key)", file=out)
    manifest = report.get("manifest") or {}
    if manifest:
        print(f"  code digest      {manifest.get('code_digest')}", file=out)
        for m in manifest.get("models", []):
            print(f"  model            {m['name']} v{m['version']} sha256 {m['sha256']}", file=out)
