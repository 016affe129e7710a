"""``sealserve demo``: the whole story on one machine, with the bundled digits model.

1. The owner encrypts the model and deposits its key at a key broker whose policy
   releases it only to the expected workload on an attested platform (simulated here).
2. The server starts on the simulated SEV-SNP platform, attests to the broker and gets
   the key: plaintext weights exist only in its memory.
3. A client verifies the server's attestation before it sends anything, then calls it
   with a token (an account that accepted the terms of service).
4. Honest traffic gets useful answers (perturbed, watermarked on a small fraction).
5. A uniform-noise extraction attack from a second account is detected and the
   account suspended, while the honest account keeps being served.
6. A thief that slipped past trains a replica from its answers; the watermark proves it
   (needs the [redteam] extra; skipped with a hint without it, or with --quick).
7. The signed audit log verifies; ``sealserve audit report`` reads it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# --help shows plain text (the module docstring is reStructuredText for developers).
DESCRIPTION = """\
The whole story on one machine, with the bundled digits model (about 15 s):

 1. the owner encrypts the model and deposits its key at a key broker, whose policy
    releases it only to the expected workload on an attested platform (simulated);
 2. the server starts on the SIMULATED SEV-SNP platform, attests to the broker and
    gets the key: plaintext weights exist only in its memory;
 3. a client verifies the server's attestation before it sends a token or any input;
 4. honest traffic gets useful answers (perturbed, a small fraction watermarked), over
    gRPC and REST;
 5. a uniform-noise extraction attack from a second account is detected and the
    account suspended, while the honest account is still served;
 6. a thief with natural-looking traffic trains a replica; the watermark proves it
    (needs the [redteam] extra; skipped with a hint without it, or with --quick);
 7. the signed audit log verifies (then try: sealserve audit report DIR/audit)."""


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="the whole story locally: sealed model, attestation, defenses, watermark",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--requests", type=int, default=200, help="honest requests to send (default: %(default)s)"
    )
    p.add_argument("--workdir", type=Path, help="keep the demo's files (audit log, state) here")
    p.add_argument("--quick", action="store_true", help="skip the replica/watermark step (faster)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    return asyncio.run(_demo(args))


def _say(step: str, text: str) -> None:
    print(f"[{step}] {text}", flush=True)


ISSUER = "https://issuer.demo.sealserve.invalid"
TOS_VERSION = "2026-11"
KEY_ID = "digits-v1"


async def _demo(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import shutil
    import tempfile
    import warnings

    import numpy as np
    from pydantic import SecretStr

    from sealserve import demo
    from sealserve.attestation.launch import reference_policy
    from sealserve.attestation.policy import UnsafePolicyWarning, policy_from_toml
    from sealserve.attestation.snp_certs import TrustedRoots
    from sealserve.auth import TokenIssuer, generate_keypair
    from sealserve.broker.app import BrokerServer
    from sealserve.broker.settings import AdminSettings, BrokerSettings
    from sealserve.client import AsyncClient, Client
    from sealserve.enclave.manifest import code_digest
    from sealserve.enclave.model_file import encrypt_stream, generate_key
    from sealserve.enclave.simulated import SimulatedPlatform
    from sealserve.errors import (
        AuthenticationError,
        InputError,
        PermissionDeniedError,
        RefusedError,
    )
    from sealserve.server.app import Server
    from sealserve.server.logs import configure
    from sealserve.server.manifest import build_manifest, measure_entries, simulated_measurement
    from sealserve.server.repository import scan_repository
    from sealserve.server.settings import Settings

    configure("text", "error")
    warnings.filterwarnings("ignore", category=UnsafePolicyWarning)
    keep = args.workdir is not None
    work = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="sealserve-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    plain = demo.repository() / "digits" / "1" / "model.onnx"

    # -- 1. the owner: platform root (simulated), token issuer, sealed model, broker --
    SimulatedPlatform.create_root(work / "platform")
    key_pem, jwks = generate_keypair("ES256")
    (work / "jwks.json").write_text(json.dumps(jwks))
    repo = work / "models"
    (repo / "digits" / "1").mkdir(parents=True)
    shutil.copy(demo.repository() / "digits" / "config.toml", repo / "digits" / "config.toml")
    data_key = generate_key()
    with plain.open("rb") as src, (repo / "digits" / "1" / "model.sealed").open("wb") as dst:
        encrypt_stream(src, dst, key=data_key, key_id=KEY_ID)
    _say("owner", f"encrypted the model as key '{KEY_ID}' (no plaintext in the repository)")
    code = code_digest()
    # The form `broker set-policy` accepts without any unsafe flag: the platform (the
    # simulated one, trusted through the broker's explicitly configured local root),
    # its launch measurement and a TCB floor (`sealserve measure --launch simulated`).
    release_policy = reference_policy(
        platform="simulated-sev-snp", measurement=simulated_measurement(code)
    )
    (work / "broker").mkdir()
    warnings.filterwarnings("ignore", message="UNSAFE: the key broker trusts the SIMULATED")
    broker_settings = BrokerSettings(
        port=0,
        store_file=work / "broker" / "keys.sealed",
        master_key=SecretStr(generate_key().hex()),
        admin=AdminSettings(issuer=ISSUER, jwks_file=work / "jwks.json"),
        unsafe_simulated_root_dir=work / "platform",
    )
    broker = BrokerServer(broker_settings)
    broker.broker.add_key(KEY_ID, data_key, policy_toml=release_policy,
                          roots=("unsafe-simulated",), actor="owner")  # fmt: skip
    del data_key
    await broker.start()
    (work / "broker-cert.pem").write_bytes(broker.cert_pem)
    _say("broker", f"holds '{KEY_ID}'; releases it only to evidence with the expected "
                   "launch measurement, TCB floor, debug off")  # fmt: skip

    # -- 2. the server, on the simulated platform, with defenses --
    auth = {
        "audience": "sealserve-demo",
        "required_tos_version": TOS_VERSION,
        "issuers": [{"issuer": ISSUER, "jwks_file": str(work / "jwks.json")}],
    }
    defense = {
        "state_dir": str(work / "state"),
        "audit": {"dir": str(work / "audit"), "checkpoint_every": 200},
        "profiles": {
            "standard": {
                "noise": {"dist": "laplace", "scale": 0.02}, "renormalise": True,
                "preserve_top1": True, "round": 3, "coarsen": {"input_scale": 16},
                "watermark": {"fraction": 0.01},  # higher than the default, for a short demo
            },
        },
        "models": {
            "digits": {
                "output": "probabilities", "label": "label", "profile": "standard",
                "reference": str(demo.reference_path()),
                "volume": {"normal_per_window": 20000, "burst_per_window": 100000},
            },
        },
    }  # fmt: skip
    # Rows are the unit on a defended server: the burst holds the thief's 32-row batches.
    limits = {"tiers": {"standard": {"rate": 5000, "burst": 5000, "per_day": 200000}}}
    settings = Settings.load(
        None,
        port=0,
        model_repository=repo,
        auth=auth,
        attestation_platform="simulated",
        simulated_platform_dir=work / "platform",
        key_broker={
            "target": f"127.0.0.1:{broker.port}",
            "ca_file": work / "broker-cert.pem",
            "server_name": "localhost",
        },
        state_store=f"sqlite://{work / 'state.db'}",
        limits=limits,
        defense=defense,
        harden_process=False,
        rest={"port": 0},
    )
    server = Server(settings)
    try:
        port = await server.start()
    except BaseException:
        await broker.stop()
        raise
    assert server.tls is not None and server.manifest is not None
    _say("server", f"listening on 127.0.0.1:{port}; SIMULATED SEV-SNP platform (not a real TEE)")
    _say("server", f"key '{KEY_ID}' released by the broker after attestation; model "
                   "decrypted in memory only")  # fmt: skip
    issuer = TokenIssuer.from_pem(key_pem, issuer=ISSUER, audience="sealserve-demo")

    def token(account: str) -> str:
        return issuer.issue(account, tier="standard", scopes=["infer", "metadata"],
                            tos_version=TOS_VERSION, ttl=3600)  # fmt: skip

    try:
        # What an auditor computes independently with `sealserve measure --config ...`:
        # from the build and the config alone (the audit key made at start is attested
        # beside the manifest, in the runtime keys record).
        expected = build_manifest(settings, measure_entries(scan_repository(repo)), code=code)
        _say("auditor", f"expected manifest sha256 {expected.digest().hex()}")
        policy = policy_from_toml(
            reference_policy(
                platform="simulated-sev-snp",
                measurement=simulated_measurement(code),
                manifest_digest=expected.digest(),
            )
        )
        roots = TrustedRoots.vendors() + TrustedRoots.from_dir(work / "platform")
        target = f"127.0.0.1:{port}"
        x, y = demo.holdout()
        n = max(1, min(args.requests, len(x)))

        # -- 3. verify, then trust --
        async with AsyncClient(target, policy=policy, roots=roots) as anonymous:
            await anonymous.connect()
            assert anonymous.attestation is not None
            claims = anonymous.attestation.claims
            _say(
                "client",
                f"attested before sending anything: {claims.platform.value}, "
                f"debug {claims.debug}, manifest as expected, TLS key bound",
            )
            try:
                await anonymous.infer("digits", {"input": x[:1]})
            except AuthenticationError as exc:
                _say("client", f"request without a token refused: {exc.message}")

        # -- 4. honest traffic --
        import onnxruntime as ort

        truth = ort.InferenceSession(str(plain))  # the owner's unperturbed model
        raw = truth.run(None, {"input": x[:n]})[1]
        async with AsyncClient(target, policy=policy, roots=roots, token=token("alice")) as alice:
            outs = [await alice.infer("digits", {"input": x[i : i + 1]}) for i in range(n)]
            probs = np.concatenate([o["probabilities"] for o in outs])
            acc = float((probs.argmax(1) == y[:n]).mean())
            agree = float((probs.argmax(1) == raw.argmax(1)).mean())
            change = float(np.abs(probs - raw).mean())
            _say("alice", f"{n} honest requests: accuracy {acc:.3f}; top-1 agreement with the "
                          f"unperturbed model {agree:.3f}; mean |Δp| {change:.4f}")  # fmt: skip
            try:
                await alice.infer("digits", {"input": x[:1, :10]})
            except InputError as exc:
                _say("alice", f"malformed request refused: {exc.message}")
            # The same account over HTTP (KServe V2 REST): the SDK attests the REST port,
            # which serves the gRPC port's TLS key, then posts JSON/binary tensors.
            rest_target = f"127.0.0.1:{server.rest_port}"

            def rest_call() -> tuple[bool, dict[str, np.ndarray]]:
                with Client(rest_target, protocol="http", policy=policy, roots=roots,
                            token=token("alice")) as c:  # fmt: skip
                    same_key = c.attestation is not None and (
                        c.attestation.evidence.tls_spki == server.tls.spki_der  # type: ignore[union-attr]
                    )
                    return same_key, c.infer("digits", {"input": x[:1]})

            same_key, out = await asyncio.get_running_loop().run_in_executor(None, rest_call)
            _say("alice", f"over REST on {rest_target} (POST /v2/models/digits/infer): "
                          f"attested, same TLS key as gRPC: {same_key}; label "
                          f"{int(out['label'][0])}")  # fmt: skip

            # -- 5. an extraction attack from another account --
            rng = np.random.default_rng(0)
            async with AsyncClient(target, policy=policy, roots=roots, token=token("mallory"),
                                   solve_challenges=False) as mallory:  # fmt: skip
                stopped = None
                for i in range(1000):
                    q = rng.uniform(0, 16, (1, 64)).astype(np.float32)
                    try:
                        await mallory.infer("digits", {"input": q})
                    except (RefusedError, PermissionDeniedError) as exc:
                        stopped = (i + 1, type(exc).__name__, exc.message)
                        break
            quota = server.plane.guard.quota
            assert quota is not None
            st = quota.status("mallory")
            if stopped:
                _say("mallory", f"uniform-noise extraction refused after {stopped[0]} queries "
                                f"({stopped[1]}: {stopped[2]})")  # fmt: skip
            _say("detector", f"mallory is {st.kind.value}: {st.reason[:160]}")
            ok = await alice.infer("digits", {"input": x[:1]})
            _say("alice", f"still served during the attack: digit {int(ok['label'][0])}")

        # -- 6. a thief that looked honest, and the watermark --
        try:
            import sklearn  # noqa: F401  (the replica step needs the [redteam] extra)
        except ImportError:
            args.quick = True
            _say(
                "thief", "skipped: scikit-learn is not installed (pip install 'sealserve[redteam]')"
            )
        if not args.quick:
            from sklearn.datasets import load_digits
            from sklearn.neural_network import MLPClassifier

            from sealserve.defense.watermark.verify import verify

            xs, ys = load_digits(return_X_y=True)
            # Natural digits, then lightly jittered copies: traffic that looks honest.
            copies = [xs] + [xs + rng.normal(0, 0.25, xs.shape) for _ in range(4)]
            qs = np.clip(np.concatenate(copies), 0, 16).astype(np.float32)
            async with AsyncClient(target, policy=policy, roots=roots, token=token("trudy")) as t:
                labels = np.concatenate([
                    (await t.infer("digits", {"input": qs[i : i + 32]}))["label"]
                    for i in range(0, len(qs), 32)
                ])  # fmt: skip
            replica = MLPClassifier((128,), max_iter=400, random_state=0).fit(qs, labels)
            fidelity = float((replica.predict(x) == truth.run(None, {"input": x})[0]).mean())
            _say("trudy", f"trained a replica on {len(qs)} answers: fidelity {fidelity:.3f}")
            assert server.defense_secrets is not None
            ledger = server.defense_secrets.ledger
            stolen = verify(ledger, lambda a: replica.predict_proba(a), account="trudy")
            innocent = MLPClassifier((64,), max_iter=300, random_state=7).fit(xs, ys)
            clean = verify(ledger, lambda a: innocent.predict_proba(a), account="trudy")
            sig = stolen.signal
            tilt = "" if sig is None else f", signal z = {sig.z:.1f}"
            _say("owner", f"watermark on trudy's replica: {stolen.matches}/{stolen.trials} "
                          f"marks reproduced{tilt}, p = {stolen.p_value:.2g} -> "
                          f"{'PROVEN' if stolen.watermark_present else 'not proven'}")  # fmt: skip
            _say("owner", f"watermark on an independently trained model: p = {clean.p_value:.2g}"
                          f" -> {'PROVEN' if clean.watermark_present else 'no claim'}")  # fmt: skip

        # -- 7. the audit trail --
        from sealserve.defense.audit.log import log_files
        from sealserve.defense.audit.verify import verify_audit_log

        output = server.plane.guard.output
        assert output is not None and output.audit is not None
        import time

        output.audit.checkpoint_at_time(time.time())
        secrets = server.defense_secrets
        assert secrets is not None and secrets.audit_key is not None
        report = verify_audit_log(log_files(work / "audit"),
                                  trusted_public_keys=[secrets.audit_key.public_bytes])  # fmt: skip
        _say("auditor", f"audit log verifies: {report.summary()}")
    finally:
        await server.stop(grace=1.0)
        await broker.stop()
    if keep:
        _say("done", f"files kept in {work}; try: sealserve audit report {work / 'audit'}")
    else:
        shutil.rmtree(work, ignore_errors=True)
        _say("done", "demo finished")
    return 0
