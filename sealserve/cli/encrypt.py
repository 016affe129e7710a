"""``sealserve encrypt MODEL.onnx --key-id ID --out FILE (--key-file PATH | --broker ...)``.

Encrypts a model into the sealed model format with a new random data key, and either
writes that key to a key file the owner keeps (mode 0600, never in or below the
output's directory) or deposits it at the key broker (``--broker HOST:PORT`` with an
admin token; the key then never touches disk). The output is written to a temporary
file next to it and renamed into place only once encryption and the key's deposit
succeeded.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from sealserve.cli._broker_conn import add_connection_args
from sealserve.errors import ConfigError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "encrypt",
        help="encrypt a model file under a new data key",
        description=(
            "Encrypt an ONNX model (chunked AES-256-GCM) under a new random data key and "
            "write the key to a key file kept by the owner (not in the output's directory "
            "or below it), or deposit it at the key broker with --broker."
        ),
    )
    parser.add_argument("model", type=Path, help="the plaintext model (e.g. model.onnx)")
    parser.add_argument("--key-id", required=True, help="name of the data key (in the header)")
    parser.add_argument("--out", type=Path, required=True, help="the encrypted file to write")
    parser.add_argument(
        "--key-file",
        type=Path,
        help="where to write the new data key (mode 0600; must not exist yet)",
    )
    broker = parser.add_argument_group(
        "key broker", "deposit the key at the broker instead of writing --key-file"
    )
    add_connection_args(broker, required=False)
    broker.add_argument(
        "--broker-policy",
        type=Path,
        metavar="TOML",
        help="the key's release policy (default: none yet, set it with broker set-policy)",
    )
    broker.add_argument(
        "--broker-root",
        action="append",
        default=[],
        choices=("amd", "intel", "unsafe-simulated"),
        help="trusted root for this key (repeatable, no default; one per platform the "
        "policy names: amd, intel, unsafe-simulated)",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="plaintext bytes per chunk (default 4 MiB)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_encrypt)


def _encrypt(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sealserve.enclave.key_file import KeyFile, check_key_location
    from sealserve.enclave.model_file import DEFAULT_CHUNK_SIZE, encrypt_stream

    model: Path = args.model
    out: Path = args.out
    if out.exists():
        raise ConfigError(f"{out} already exists; refusing to overwrite it")
    if not model.is_file():
        raise ConfigError(f"model {model} is not a readable file")
    if out.expanduser().resolve() == model.expanduser().resolve():
        raise ConfigError("--out must differ from the model path")
    if not out.parent.is_dir():
        raise ConfigError(f"output directory {out.parent} does not exist")
    if (args.key_file is None) == (args.broker is None):
        raise ConfigError("give exactly one of --key-file PATH and --broker HOST:PORT")
    admin = None
    policy = ""
    if args.broker is not None:
        from sealserve.cli._broker_conn import connect, read_policy

        policy = read_policy(args.broker_policy)
        admin = connect(args)
    else:
        # Check before doing any work, and again when writing (the check is cheap).
        check_key_location(args.key_file, encrypted_output=out)
    key = KeyFile.generate(args.key_id)
    chunk_size = args.chunk_size or DEFAULT_CHUNK_SIZE

    size = model.stat().st_size
    bar = tqdm(
        total=size,
        unit="B",
        unit_scale=True,
        desc="hashing",
        disable=args.no_progress or size < (64 << 20),
    )

    encrypting: list[bool] = []

    def progress(done: int, total: int) -> None:
        # The library reports both passes as one count; show each pass on its own.
        half = total // 2
        if done > half and not encrypting:
            encrypting.append(True)
            bar.set_description("encrypting")
            bar.reset(total=half)
        bar.update((done - half if done > half else done) - bar.n)

    try:
        fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as exc:
        raise ConfigError(f"cannot write to {out.parent}: {exc.strerror}") from exc
    tmp = Path(tmp_name)
    try:
        with model.open("rb") as src, os.fdopen(fd, "wb") as dst:
            header = encrypt_stream(
                src,
                dst,
                key=key.key,
                key_id=key.key_id,
                chunk_size=chunk_size,
                progress=progress,
            )
            dst.flush()
            os.fsync(dst.fileno())
        bar.close()
        if admin is not None:
            admin.add_key(key.key_id, key.key, policy_toml=policy, roots=args.broker_root)
            where = f"deposited at the key broker {args.broker}"
        else:
            key_path = key.write(args.key_file, encrypted_output=out)
            where = f"written to {key_path} (mode 0600); keep it private"
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except OSError as exc:
        # Disk full, unreadable model, ...: the library raised nothing of ours.
        raise ConfigError(f"encrypting {model} to {out} failed: {exc}") from exc
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
        if admin is not None:
            admin.close()

    chunks = f"{header.chunk_count} chunk(s) of up to {header.chunk_size} bytes"
    print(f"encrypted model:  {out} ({chunks})")
    print(f"key id:           {header.key_id}")
    print(f"plaintext sha256: {header.plaintext_sha256.hex()}")
    print(f"data key:         {where}")
    return 0
