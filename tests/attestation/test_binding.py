"""report_data binding: recomputation, framing, refusal of short nonces."""

from __future__ import annotations

import hashlib
import struct

import pytest

from sealserve.attestation.binding import (
    DOMAIN_LABEL,
    compute_report_data,
    verify_report_data_binding,
)
from sealserve.errors import VerificationError

PARTS = {
    "nonce": b"n" * 32,
    "tls_spki": b"spki-der",
    "manifest": b'{"package":"sealserve"}',
    "hpke_public_key": b"k" * 32,
    "runtime_keys": b'{"audit":null,"schema":"sealserve.runtime-keys/v1"}',
}


def test_matches_the_documented_construction() -> None:
    def frame(b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + b

    sha = lambda b: hashlib.sha256(b).digest()  # noqa: E731
    expected = hashlib.sha512(
        frame(DOMAIN_LABEL)
        + frame(PARTS["nonce"])
        + frame(sha(PARTS["tls_spki"]))
        + frame(sha(PARTS["manifest"]))
        + frame(sha(PARTS["hpke_public_key"]))
        + frame(sha(PARTS["runtime_keys"]))
    ).digest()
    assert compute_report_data(**PARTS) == expected
    assert len(expected) == 64
    assert DOMAIN_LABEL == b"sealserve-attestation-v2"


def test_v1_construction_without_runtime_keys_no_longer_matches() -> None:
    # Evidence made by a v1 server (no runtime keys record) is not accepted as v2.
    def frame(b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + b

    sha = lambda b: hashlib.sha256(b).digest()  # noqa: E731
    v1 = hashlib.sha512(
        frame(b"sealserve-attestation-v1") + frame(PARTS["nonce"]) + frame(sha(PARTS["tls_spki"]))
        + frame(sha(PARTS["manifest"])) + frame(sha(PARTS["hpke_public_key"]))
    ).digest()  # fmt: skip
    with pytest.raises(VerificationError, match="runtime keys"):
        verify_report_data_binding(v1, **PARTS)


@pytest.mark.parametrize("part", sorted(PARTS))
def test_every_part_changes_the_binding(part: str) -> None:
    changed = {**PARTS, part: PARTS[part] + b"x"}
    assert compute_report_data(**changed) != compute_report_data(**PARTS)
    with pytest.raises(VerificationError, match="report_data_binding") as err:
        verify_report_data_binding(compute_report_data(**PARTS), **changed)
    assert err.value.check == "report_data_binding"


def test_framing_prevents_shifting_bytes_between_nonce_and_digests() -> None:
    # A longer nonce that swallows bytes must not produce the same preimage.
    a = compute_report_data(**{**PARTS, "nonce": b"n" * 33})
    b = compute_report_data(**PARTS)
    assert a != b


def test_matching_binding_passes() -> None:
    verify_report_data_binding(compute_report_data(**PARTS), **PARTS)


@pytest.mark.parametrize("length", [0, 16, 31])
def test_short_nonces_are_refused(length: int) -> None:
    with pytest.raises(VerificationError, match="nonce must be 32") as err:
        compute_report_data(**{**PARTS, "nonce": b"x" * length})
    assert err.value.check == "nonce"
