"""Encrypted model loading: decryption throughput, load time and peak memory.

    PYTHONPATH=. python bench/bench_model_crypto.py [--size-mb 200] [--repeat 3]

Builds a real ONNX model of about ``--size-mb`` MB (one MatMul with a large float32
weight), encrypts it with ``sealserve.enclave.model_file`` and measures, each in a
fresh subprocess (so ``ru_maxrss`` is that measurement's own peak):

- AEAD-only decryption throughput, pinned to one core (AES-256-GCM, the reused chunk
  buffers of decrypt_to_bytes without its allocation or SHA-256);
- ``decrypt_to_bytes`` end to end (allocation, AES-GCM, SHA-256), pinned to one core
  and unpinned (it hashes on a second thread);
- onnxruntime load from the plaintext path (the baseline), from plaintext bytes, and
  from the encrypted file (decrypt_to_bytes then InferenceSession(bytes), as the
  server loads it).

The plaintext model is written to a temporary directory only for the baseline; the
encrypted path reads only the encrypted file and never writes plaintext anywhere.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_model(path: Path, size_mb: int) -> int:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    n = int((size_mb * 1e6 / 4) ** 0.5)
    weight = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "bench",
        [x],
        [y],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = model.SerializeToString()
    path.write_bytes(data)
    return len(data)


def child(mode: str, plain: str, sealed: str, key_hex: str) -> dict[str, float]:
    """One measurement in this (fresh) process."""
    key = bytes.fromhex(key_hex)
    if mode.endswith("-1core"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    if mode.startswith("load"):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
    from sealserve.enclave import model_file as mf

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    nbytes = 0
    if mode == "aead-1core":
        with open(sealed, "rb") as f:
            header = mf.read_header(f)
            keys = mf._authenticate_header(header, key)
            digest = header.digest
            cbuf = bytearray(header.chunk_size + mf.TAG_SIZE)
            out = bytearray(header.chunk_size)
            blobs = []
            for i in range(header.chunk_count):  # read first: time only the AEAD
                n = min(header.chunk_size, header.plaintext_length - i * header.chunk_size)
                blobs.append(f.read(n + mf.TAG_SIZE))
            t0 = time.perf_counter()
            for i, blob in enumerate(blobs):
                n = len(blob) - mf.TAG_SIZE
                final = i == header.chunk_count - 1
                keys.aead.decrypt_into(
                    keys.nonce(i), blob, mf._aad(digest, i, final), memoryview(out)[:n]
                )
                nbytes += n
            del cbuf
    elif mode.startswith("decrypt"):
        with open(sealed, "rb") as f:
            nbytes = len(mf.decrypt_to_bytes(f, key=key))
    elif mode == "load-path":
        ort.InferenceSession(plain, providers=providers)
    elif mode == "load-plain-bytes":
        with open(plain, "rb") as f:
            ort.InferenceSession(f.read(), providers=providers)
    elif mode == "load-encrypted":
        with open(sealed, "rb") as f:
            model = mf.decrypt_to_bytes(f, key=key)
        ort.InferenceSession(model, providers=providers)
    else:
        raise SystemExit(f"unknown mode {mode}")
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "bytes": nbytes, "maxrss_mb": rss / 1024, "rss0_mb": rss0 / 1024}


def run(mode: str, plain: Path, sealed: Path, key: bytes) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(plain), str(sealed), key.hex()],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chunk-mib", type=int, default=4)
    parser.add_argument("--child", nargs=4, metavar=("MODE", "PLAIN", "SEALED", "KEY"))
    parser.add_argument("--make", nargs=2, metavar=("PATH", "SIZE_MB"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    if args.make:
        print(make_model(Path(args.make[0]), int(args.make[1])))
        return

    from sealserve.enclave.model_file import encrypt_stream, generate_key

    with tempfile.TemporaryDirectory(prefix="sealserve-bench-") as tmp:
        plain, sealed = Path(tmp) / "model.onnx", Path(tmp) / "model.sealed"
        # In a child: Linux carries a parent's peak RSS into children it forks, so the
        # parent stays small for each child's ru_maxrss to be its own.
        made = subprocess.run(
            [sys.executable, __file__, "--make", str(plain), str(args.size_mb)],
            capture_output=True,
            text=True,
            check=True,
        )
        size = int(made.stdout)
        key = generate_key()
        chunk = args.chunk_mib << 20
        t0 = time.perf_counter()
        with plain.open("rb") as src, sealed.open("wb") as dst:
            encrypt_stream(src, dst, key=key, key_id="bench", chunk_size=chunk)
        enc_s = time.perf_counter() - t0

        modes = [
            "aead-1core",
            "decrypt-1core",
            "decrypt",
            "load-path",
            "load-plain-bytes",
            "load-encrypted",
        ]
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for _ in range(args.repeat):  # interleaved, so drift hits every mode alike
            for m in modes:
                runs[m].append(run(m, plain, sealed, key))

    def med(m: str, field: str) -> float:
        # Times: the minimum (the machine is shared; noise only adds). Memory: median.
        values = [r[field] for r in runs[m]]
        return min(values) if field == "seconds" else statistics.median(values)

    mb = size / 1e6
    gbps = {m: size / med(m, "seconds") / 1e9 for m in ("aead-1core", "decrypt-1core", "decrypt")}
    base_t, base_rss = med("load-path", "seconds"), med("load-path", "maxrss_mb")
    print(
        f"model: {mb:.0f} MB ONNX (MatMul, float32 weight), chunk {args.chunk_mib} MiB, "
        f"best time / median peak RSS of {args.repeat} fresh processes each; "
        f"{os.cpu_count()} CPUs; "
        f"encrypt took {enc_s:.2f} s ({size / enc_s / 1e9:.2f} GB/s)\n"
    )
    print("| measurement | time (s) | throughput | vs plaintext load | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|")
    for m, label in [
        ("aead-1core", "AES-256-GCM decrypt only, 1 core"),
        ("decrypt-1core", "decrypt_to_bytes (alloc + AEAD + SHA-256), 1 core"),
        ("decrypt", "decrypt_to_bytes, SHA-256 on a 2nd thread"),
    ]:
        print(
            f"| {label} | {med(m, 'seconds'):.3f} | {gbps[m]:.2f} GB/s | | "
            f"{med(m, 'maxrss_mb'):.0f} |"
        )
    for m, label in [
        ("load-path", "onnxruntime load, plaintext path (baseline)"),
        ("load-plain-bytes", "onnxruntime load, plaintext bytes"),
        ("load-encrypted", "decrypt_to_bytes + onnxruntime load from bytes"),
    ]:
        t, rss = med(m, "seconds"), med(m, "maxrss_mb")
        print(f"| {label} | {t:.3f} | | {t / base_t:.2f}x | {rss:.0f} (+{rss - base_rss:.0f}) |")
    limit = base_rss + mb + 2 * args.chunk_mib * 1.048576
    print(
        f"\npeak-memory target for the encrypted load: <= {limit:.0f} MB "
        f"(baseline {base_rss:.0f} + plaintext {mb:.0f} + 2 chunks)"
    )


if __name__ == "__main__":
    main()
