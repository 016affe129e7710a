"""``sealserve demo``: serve the bundled digits model and send it real requests."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="start a local server with the bundled model and talk to it",
        description=(
            "Starts sealserve on 127.0.0.1 with the bundled digits classifier, connects "
            "with the SDK over TLS, and prints every step: metadata, predictions on "
            "held-out digits, a malformed request refused, the server still serving."
        ),
    )
    p.add_argument("--requests", type=int, default=200, help="held-out digits to classify")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    return asyncio.run(_demo(args.requests))


ISSUER = "https://issuer.demo.sealserve.invalid"
TOS_VERSION = "2026-11"


def _say(step: str, text: str) -> None:
    print(f"[{step}] {text}", flush=True)


async def _demo(n: int) -> int:
    import asyncio
    import json
    import shutil
    import tempfile
    import warnings
    from pathlib import Path

    import numpy as np

    from sealserve import demo
    from sealserve.attestation.policy import UnsafePolicyWarning, policy_from_toml
    from sealserve.attestation.snp_certs import TrustedRoots
    from sealserve.auth import TokenIssuer, generate_keypair
    from sealserve.client import AsyncClient
    from sealserve.enclave.simulated import SimulatedPlatform
    from sealserve.errors import AuthenticationError, InputError
    from sealserve.server.app import Server
    from sealserve.server.logs import configure
    from sealserve.server.manifest import build_manifest, measure_entries
    from sealserve.server.repository import scan_repository
    from sealserve.server.settings import Settings

    configure("text", "error")
    warnings.filterwarnings("ignore", category=UnsafePolicyWarning)
    tmp = Path(tempfile.mkdtemp(prefix="sealserve-demo-"))
    # The operator's token issuer: a signing key kept in memory; only the public JWKS
    # is written to disk, for the server to read.
    key_pem, jwks = generate_keypair("ES256")
    (tmp / "jwks.json").write_text(json.dumps(jwks))
    auth = {
        "audience": "sealserve-demo",
        "required_tos_version": TOS_VERSION,
        "issuers": [{"issuer": ISSUER, "jwks_file": str(tmp / "jwks.json")}],
    }
    # A simulated SEV-SNP platform (a real deployment runs in a confidential VM).
    SimulatedPlatform.create_root(tmp / "platform")
    settings = Settings.load(
        None,
        port=0,
        model_repository=demo.repository(),
        auth=auth,
        attestation_platform="simulated",
        simulated_platform_dir=tmp / "platform",
    )
    issuer = TokenIssuer.from_pem(key_pem, issuer=ISSUER, audience="sealserve-demo")
    token = issuer.issue(
        "alice", tier="standard", scopes=["infer", "metadata"], tos_version=TOS_VERSION,
        ttl=3600,
    )  # fmt: skip
    server = Server(settings)
    port = await server.start()
    assert server.tls is not None and server.manifest is not None
    _say("server", f"listening on 127.0.0.1:{port} with an in-memory TLS key")
    _say("server", "attestation: SIMULATED SEV-SNP platform (not a real TEE)")
    # What an auditor computes independently with `sealserve measure --config ...`.
    expected = build_manifest(settings, measure_entries(scan_repository(demo.repository())))
    _say("auditor", f"expected manifest sha256 {expected.digest().hex()}")
    policy = policy_from_toml(
        "version = 1\nunsafe_allow_simulated = true\n"
        f'manifest_digests = ["{expected.digest().hex()}"]\n'
    )
    roots = TrustedRoots.amd() + TrustedRoots.from_dir(tmp / "platform")
    _say("server", f"tokens from issuer '{ISSUER}' required; terms of service {TOS_VERSION}")
    x, y = demo.holdout()
    n = max(1, min(n, len(x)))
    try:
        async with AsyncClient(f"127.0.0.1:{port}", policy=policy, roots=roots) as anonymous:
            await anonymous.connect()
            assert anonymous.attestation is not None
            claims = anonymous.attestation.claims
            _say(
                "client",
                f"attested before sending anything: platform {claims.platform.value}, "
                f"debug {claims.debug}, manifest {(claims.manifest_digest or b'').hex()[:16]}..., "
                "TLS key bound in evidence = TLS key of this channel",
            )
            try:
                await anonymous.infer("digits", {"input": x[:1]})
            except AuthenticationError as exc:
                _say("client", f"request without a token refused: {exc.message}")
        _say("client", "account 'alice' holds a token (scopes infer, metadata)")
        async with AsyncClient(
            f"127.0.0.1:{port}", policy=policy, roots=roots, token=token
        ) as client:
            _say("client", f"server ready: {await client.server_ready()}")
            meta = await client.model_metadata("digits")
            ins = ", ".join(f"{t.name} {t.datatype} {list(t.shape)}" for t in meta.inputs)
            outs = ", ".join(f"{t.name} {t.datatype} {list(t.shape)}" for t in meta.outputs)
            _say("client", f"model digits v{meta.versions[-1]}: inputs {ins}; outputs {outs}")
            results = await asyncio.gather(
                *(client.infer("digits", {"input": x[i : i + 1]}) for i in range(n))
            )
            labels = np.concatenate([r["label"] for r in results])
            acc = float((labels == y[:n]).mean())
            _say("client", f"classified {n} held-out digits one request each: accuracy {acc:.3f}")
            batch = await client.infer("digits", {"input": x[:32]}, outputs=["probabilities"])
            _say(
                "client",
                f"one batched request of 32: probabilities {batch['probabilities'].shape}, "
                f"rows sum to {batch['probabilities'].sum(axis=1).mean():.3f}",
            )
            try:
                await client.infer("digits", {"input": x[:1, :10]})
            except InputError as exc:
                _say("client", f"malformed request refused as expected: {exc.message}")
            again = await client.infer("digits", {"input": x[:1]})
            _say("client", f"server still serving: digit {int(again['label'][0])}")
    finally:
        await server.stop(grace=1.0)
        shutil.rmtree(tmp, ignore_errors=True)
    _say("done", "demo finished")
    return 0
