"""Key release round trip on loopback: challenge + evidence + verify + HPKE.

    PYTHONPATH=. python bench/bench_key_release.py [-n 200] [--write-results]

Starts `sealserve broker serve` as its own process on 127.0.0.1 (TLS, in-memory
certificate, simulated root trusted, a key whose policy pins the simulated guest's
measurement), then times, as the enclave sees it:

- `fetch_model_key`: a new TLS channel, GetChallenge, a simulated report, ReleaseKey
  (broker: parse, redeem nonce, verify chain + binding + policy, HPKE seal), HPKE open;
- the same exchange on an open channel (what a server fetching several keys pays);
- the local pieces alone: making the evidence, and HPKE seal + open.

Prints a markdown table of medians (and p95). Target: <= 50 ms per release.
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sealserve._proto import broker_pb2 as bpb  # noqa: E402
from sealserve._proto import broker_pb2_grpc  # noqa: E402
from sealserve.auth import TokenIssuer, generate_keypair  # noqa: E402
from sealserve.broker.admin_client import BrokerAdmin  # noqa: E402
from sealserve.enclave.key_release import fetch_model_key, hpke_public_bytes  # noqa: E402
from sealserve.enclave.key_wrap import SealedKey, open_data_key, seal_data_key  # noqa: E402
from sealserve.enclave.model_file import generate_key  # noqa: E402
from sealserve.enclave.platform import attest  # noqa: E402
from sealserve.enclave.simulated import DEFAULT_MEASUREMENT, SimulatedPlatform  # noqa: E402

MANIFEST = b'{"sealserve": "bench manifest"}' * 20
SPKI = os.urandom(91)


def measure(fn: Callable[[], object], n: int) -> tuple[float, float]:
    for _ in range(3):
        fn()  # warm-up: caches, connections
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[int(0.95 * (n - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=200, help="timed runs per case")
    parser.add_argument("--write-results", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sim = SimulatedPlatform.create_root(tmp / "sim")
        pem, jwks = generate_keypair("ES256")
        (tmp / "jwks.json").write_text(json.dumps(jwks))
        issuer = TokenIssuer.from_pem(pem, issuer="https://bench", audience="sealserve-broker")
        token = issuer.issue(
            "bench", tier="admin", scopes=["admin"], tos_version="broker-admin", ttl=3600
        )
        (tmp / "broker.toml").write_text(
            f'port = 0\nstore_file = "keys.sealed"\nmaster_key = "{os.urandom(32).hex()}"\n'
            f'unsafe_simulated_root_dir = "{sim}"\nlog_level = "warning"\n'
            f'[admin]\nissuer = "https://bench"\njwks_file = "{tmp / "jwks.json"}"\n'
        )
        ready = tmp / "ready.json"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen(
            [sys.executable, "-m", "sealserve", "broker", "serve", "--config",
             str(tmp / "broker.toml"), "--ready-file", str(ready)],
            env=env,
        )  # fmt: skip
        try:
            while not ready.exists():
                if proc.poll() is not None:
                    raise SystemExit("broker failed to start")
                time.sleep(0.05)
            info = json.loads(ready.read_text())
            target, ca = f"127.0.0.1:{info['port']}", info["tls_cert_pem"].encode()
            policy = (
                "unsafe_allow_simulated = true\n"
                f'[sev-snp]\nmeasurement = ["{DEFAULT_MEASUREMENT.hex()}"]\n'
            )
            data_key = generate_key()
            with BrokerAdmin(target, token=token, ca_pem=ca) as admin:
                admin.add_key("bench", data_key, policy_toml=policy, roots=["unsafe-simulated"])
            platform = SimulatedPlatform(sim)
            hpke = X25519PrivateKey.generate()
            public = hpke_public_bytes(hpke)

            def fetch() -> None:
                key = fetch_model_key(
                    target,
                    key_id="bench",
                    platform=platform,
                    tls_spki=SPKI,
                    manifest=MANIFEST,
                    hpke_private_key=hpke,
                    broker_ca_pem=ca,
                )
                assert key == data_key

            channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(ca))
            stub = broker_pb2_grpc.KeyBrokerStub(channel)

            def on_channel() -> None:
                nonce = bytes(stub.GetChallenge(bpb.GetChallengeRequest(), timeout=10).nonce)
                ev = attest(
                    platform, nonce=nonce, tls_spki=SPKI, manifest=MANIFEST, hpke_public_key=public
                )
                r = stub.ReleaseKey(
                    bpb.ReleaseKeyRequest(key_id="bench", evidence=ev.to_bytes()), timeout=10
                )
                sealed = SealedKey(r.enc, r.ciphertext, r.kem_id, r.kdf_id, r.aead_id)
                assert (
                    open_data_key(sealed, private_key=hpke, key_id="bench", nonce=nonce) == data_key
                )

            nonce = os.urandom(32)

            def evidence_only() -> None:
                attest(
                    platform, nonce=nonce, tls_spki=SPKI, manifest=MANIFEST, hpke_public_key=public
                )

            def hpke_only() -> None:
                sealed = seal_data_key(
                    data_key, recipient_public_key=public, key_id="b", nonce=nonce
                )
                open_data_key(sealed, private_key=hpke, key_id="b", nonce=nonce)

            rows = [
                ("fetch_model_key (new TLS channel + challenge + evidence + release + open)", *measure(fetch, args.n)),
                ("release on an open channel (challenge + evidence + release + open)", *measure(on_channel, args.n)),
                ("  of which: simulated evidence (report + ECDSA P-384 signature)", *measure(evidence_only, args.n)),
                ("  of which: HPKE seal + open (X25519, HKDF-SHA256, AES-256-GCM)", *measure(hpke_only, args.n)),
            ]  # fmt: skip
            channel.close()
        finally:
            proc.terminate()
            proc.wait(30)

    body = "| measurement | median (ms) | p95 (ms) |\n|---|---:|---:|\n"
    body += "".join(f"| {name} | {med:.2f} | {p95:.2f} |\n" for name, med, p95 in rows)
    body += f"\nN = {args.n} per row, broker in its own process on loopback. Target: <= 50 ms.\n"
    print(body)
    if args.write_results:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _results import write_section

        write_section(
            "Key release", f"PYTHONPATH=. python bench/bench_key_release.py -n {args.n}", body
        )


if __name__ == "__main__":
    main()
