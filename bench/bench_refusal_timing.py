"""Broker refusals for an existing and for an unknown key id: same answer, same time.

    PYTHONPATH=. python bench/bench_refusal_timing.py [-n 300] [--write-results]

The broker verifies the evidence in full before it looks the key id up, so a refused
release costs the same whether the key id exists or not (issue trust-root: a
malformed VCEK used to answer INTERNAL for an existing id and PERMISSION_DENIED for an
unknown one, measurably faster). Two cases, each timed for key id "model" (exists,
policy pins another measurement) and "no-such-key" (unknown), interleaved call by call
so that machine noise hits both alike:

- evidence that verifies but fails the key's policy (another measurement);
- evidence whose VCEK is garbage.

Measured twice: in process (``KeyBroker.release``, no network) and over gRPC against
``sealserve broker serve`` in its own process on 127.0.0.1. Prints medians and the
ratio unknown / existing; the target is a ratio within 0.90..1.10.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import SecretStr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sealserve._proto import broker_pb2 as bpb  # noqa: E402
from sealserve._proto import broker_pb2_grpc  # noqa: E402
from sealserve.attestation.snp_certs import VCEK_GUID, CertTable  # noqa: E402
from sealserve.auth import TokenIssuer, generate_keypair  # noqa: E402
from sealserve.broker.admin_client import BrokerAdmin  # noqa: E402
from sealserve.broker.app import build_broker  # noqa: E402
from sealserve.broker.settings import AdminSettings, BrokerSettings  # noqa: E402
from sealserve.enclave.key_release import hpke_public_bytes  # noqa: E402
from sealserve.enclave.model_file import generate_key  # noqa: E402
from sealserve.enclave.platform import attest  # noqa: E402
from sealserve.enclave.simulated import SimulatedPlatform  # noqa: E402
from sealserve.errors import KeyReleaseError  # noqa: E402

MANIFEST = b'{"sealserve": "bench manifest"}'
SPKI = os.urandom(91)
POLICY = f'unsafe_allow_simulated = true\n[sev-snp]\nmeasurement = ["{"ab" * 48}"]\n'
GARBAGE_VCEK = CertTable.build({VCEK_GUID: b"\x30\x82\x01\x00" + b"\xff" * 200}).to_bytes()


def paired(
    prepare: Callable[[str], Callable[[], tuple[object, str]]], n: int
) -> tuple[float, float, set[tuple[object, str]]]:
    """Median ms of the release call alone (challenge and evidence are made before the
    clock starts) for "model" and "no-such-key", alternating which goes first."""
    times: dict[str, list[float]] = {"model": [], "no-such-key": []}
    answers: set[tuple[object, str]] = set()
    for i in range(n + 5):
        order = ("model", "no-such-key") if i % 2 else ("no-such-key", "model")
        for key_id in order:
            call = prepare(key_id)
            start = time.perf_counter()
            answers.add(call())
            if i >= 5:  # warm-up
                times[key_id].append((time.perf_counter() - start) * 1e3)
    return statistics.median(times["model"]), statistics.median(times["no-such-key"]), answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=300, help="timed pairs per case")
    parser.add_argument("--write-results", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows: list[tuple[str, str, float, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sim = SimulatedPlatform.create_root(tmp / "sim")
        platform = SimulatedPlatform(sim)
        public = hpke_public_bytes(X25519PrivateKey.generate())
        pem, jwks = generate_keypair("ES256")
        (tmp / "jwks.json").write_text(json.dumps(jwks))

        def evidence(nonce: bytes, case: str) -> bytes:
            ev = attest(platform, nonce=nonce, tls_spki=SPKI, manifest=MANIFEST,
                        hpke_public_key=public)  # fmt: skip
            if case == "garbage VCEK":
                ev = dataclasses.replace(ev, certs=GARBAGE_VCEK)
            return ev.to_bytes()

        # In process.
        broker = build_broker(BrokerSettings(
            port=0, store_file=tmp / "keys.sealed", master_key=SecretStr("11" * 32),
            admin=AdminSettings(issuer="https://bench", jwks_file=tmp / "jwks.json"),
            unsafe_simulated_root_dir=sim,
        ))  # fmt: skip
        broker.add_key("model", generate_key(), policy_toml=POLICY, roots=("unsafe-simulated",))
        for case in ("policy refused", "garbage VCEK"):

            def local(key_id: str, case: str = case) -> Callable[[], tuple[object, str]]:
                data = evidence(broker.challenge(), case)

                def call() -> tuple[object, str]:
                    try:
                        broker.release(key_id, data)
                    except KeyReleaseError as exc:
                        return "KeyReleaseError", exc.message
                    raise SystemExit("a release that should be refused was not")

                return call

            existing, unknown, answers = paired(local, args.n)
            rows.append(("in process", case, existing, unknown, repr(sorted(answers))))

        # Over gRPC, broker in its own process.
        issuer = TokenIssuer.from_pem(pem, issuer="https://bench", audience="sealserve-broker")
        token = issuer.issue("bench", tier="admin", scopes=["admin"],
                             tos_version="broker-admin", ttl=3600)  # fmt: skip
        (tmp / "broker.toml").write_text(
            f'port = 0\nstore_file = "keys2.sealed"\nmaster_key = "{os.urandom(32).hex()}"\n'
            f'unsafe_simulated_root_dir = "{sim}"\nlog_level = "error"\n'
            f'[admin]\nissuer = "https://bench"\njwks_file = "{tmp / "jwks.json"}"\n'
        )
        ready = tmp / "ready.json"
        proc = subprocess.Popen(
            [sys.executable, "-m", "sealserve", "broker", "serve", "--config",
             str(tmp / "broker.toml"), "--ready-file", str(ready)],
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )  # fmt: skip
        try:
            while not ready.exists():
                if proc.poll() is not None:
                    raise SystemExit("broker failed to start")
                time.sleep(0.05)
            info = json.loads(ready.read_text())
            target, ca = f"127.0.0.1:{info['port']}", info["tls_cert_pem"].encode()
            with BrokerAdmin(target, token=token, ca_pem=ca) as admin:
                admin.add_key("model", generate_key(), policy_toml=POLICY,
                              roots=["unsafe-simulated"])  # fmt: skip
            with grpc.secure_channel(target, grpc.ssl_channel_credentials(ca)) as channel:
                stub = broker_pb2_grpc.KeyBrokerStub(channel)
                for case in ("policy refused", "garbage VCEK"):

                    def remote(key_id: str, case: str = case) -> Callable[[], tuple[object, str]]:
                        nonce = bytes(
                            stub.GetChallenge(bpb.GetChallengeRequest(), timeout=10).nonce
                        )
                        request = bpb.ReleaseKeyRequest(
                            key_id=key_id, evidence=evidence(nonce, case)
                        )

                        def call() -> tuple[object, str]:
                            try:
                                stub.ReleaseKey(request, timeout=10)
                            except grpc.RpcError as exc:
                                return exc.code().name, exc.details() or ""
                            raise SystemExit("a release that should be refused was not")

                        return call

                    existing, unknown, answers = paired(remote, args.n)
                    rows.append(("gRPC", case, existing, unknown, repr(sorted(answers))))
        finally:
            proc.terminate()
            proc.wait(30)

    body = (
        "| path | refusal | existing id median (ms) | unknown id median (ms) | ratio | answers |\n"
        "|---|---|---:|---:|---:|---|\n"
    )
    body += "".join(
        f"| {path} | {case} | {e:.3f} | {u:.3f} | {u / e:.3f} | {answers} |\n"
        for path, case, e, u, answers in rows
    )
    body += (
        f"\nN = {args.n} interleaved pairs per row; timed: the ReleaseKey call alone (a fresh "
        "challenge and simulated evidence are made before each). One answer per row means the caller cannot tell the ids "
        "apart by status or message. 2-core dev machine, shared. Target: ratio 0.90..1.10.\n"
    )
    print(body)
    if args.write_results:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _results import write_section

        write_section(
            "Broker refusals: existing vs unknown key id (issue 15)",
            f"PYTHONPATH=. python bench/bench_refusal_timing.py -n {args.n} --write-results",
            body,
        )


if __name__ == "__main__":
    main()
