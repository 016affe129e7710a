"""TDX quote parsing: structure, format errors, and a bounded fuzz of the parser."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealserve.attestation.tdx import verify_tdx_at_time
from sealserve.attestation.tdx_quote import TdReport, TdxQuote
from sealserve.errors import EvidenceFormatError, SealserveError

from ._tdx_util import GENUINE, NOW, raw

V4 = "tdx/go-tdx-guest/tdx_prod_quote_SPR_E4.dat"
V5 = "tdx/go-tdx-guest/quote_v5_sample.dat"


def test_v4_structure() -> None:
    q = TdxQuote.from_bytes(raw(V4))
    assert q.header.version == 4
    assert q.body_type == 2
    assert len(q.signed_data) == 48 + 584
    assert q.td_report.tee_tcb_svn2 is None and q.td_report.mrservicetd is None
    assert q.qe_report.isvprodid == 2 and q.qe_report.isvsvn == 4
    assert len(q.qe_auth_data) == 32
    assert q.pck_chain_pem.startswith(b"-----BEGIN CERTIFICATE-----")
    # This upstream vector carries 39 unsigned bytes after the signature data.
    assert q.trailing == 39


def test_v5_structure() -> None:
    q = TdxQuote.from_bytes(raw(V5))
    assert q.header.version == 5
    assert q.body_type == 3
    assert len(q.signed_data) == 48 + 6 + 648
    assert q.td_report.tee_tcb_svn2 == bytes.fromhex("0d010400000000000000000000000000")
    assert q.trailing == 0


def test_mrtd_offsets_match_sources_md() -> None:
    # SOURCES.md: MRTD starts at quote offset 184 (v4) and 190 (v5).
    assert raw(V4)[184:232] == TdxQuote.from_bytes(raw(V4)).td_report.mrtd
    assert raw(V5)[190:238] == TdxQuote.from_bytes(raw(V5)).td_report.mrtd


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: _patch(d, 0, "<H", 3), "unsupported quote version 3"),
        (lambda d: _patch(d, 2, "<H", 3), "unsupported attestation key type 3"),
        (lambda d: _patch(d, 4, "<I", 0), "not TDX"),
        (lambda d: d[:47], "truncated: header user_data"),
        (lambda d: d[:600], "truncated: TD report body"),
        (lambda d: d[:700], "signature data size"),
        (lambda d: b"", "truncated: header version"),
        (lambda d: b"\x00" * 5000, "unsupported quote version 0"),
    ],
)
def test_format_errors(mutate: object, message: str) -> None:
    assert callable(mutate)
    with pytest.raises(EvidenceFormatError, match=message) as info:
        TdxQuote.from_bytes(mutate(raw(V4)))
    assert info.value.check == "quote_format"
    assert info.value.message.startswith("TDX quote: ")


def test_v5_bad_body_type_and_size() -> None:
    with pytest.raises(EvidenceFormatError, match="unsupported v5 body type 1"):
        TdxQuote.from_bytes(_patch(raw(V5), 48, "<H", 1))
    with pytest.raises(EvidenceFormatError, match="has size 584, expected 648"):
        TdxQuote.from_bytes(_patch(raw(V5), 50, "<I", 584))


def test_wrong_certification_data_types() -> None:
    q = TdxQuote.from_bytes(raw(V4))
    cert_type_at = len(q.signed_data) + 4 + 128
    with pytest.raises(EvidenceFormatError, match="certification data type 5 unsupported"):
        TdxQuote.from_bytes(_patch(raw(V4), cert_type_at, "<H", 5))
    inner_at = cert_type_at + 6 + 384 + 64 + 2 + 32
    with pytest.raises(EvidenceFormatError, match="inner certification data type 3"):
        TdxQuote.from_bytes(_patch(raw(V4), inner_at, "<H", 3))


def test_not_bytes_is_a_format_error() -> None:
    with pytest.raises(EvidenceFormatError, match="expected bytes"):
        TdxQuote.from_bytes("not bytes")  # type: ignore[arg-type]


def test_td_report_wrong_size() -> None:
    with pytest.raises(EvidenceFormatError, match="583 bytes"):
        TdReport.from_bytes(b"\x00" * 583)


_SEEDS = [raw(name) for name in GENUINE]


@st.composite
def _mutated_quote(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    return bytes(data if cut is None else data[:cut])


_FUZZ = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@_FUZZ
@given(st.binary(max_size=1200))
def test_fuzz_parser_random_bytes(data: bytes) -> None:
    with contextlib.suppress(SealserveError):
        TdxQuote.from_bytes(data)


@_FUZZ
@given(_mutated_quote())
def test_fuzz_parser_mutated_quotes(data: bytes) -> None:
    with contextlib.suppress(SealserveError):
        TdxQuote.from_bytes(data)


@_FUZZ
@given(_mutated_quote())
def test_fuzz_verifier_mutated_quotes(data: bytes) -> None:
    # Whatever the damage, only sealserve errors may escape the verifier.
    with contextlib.suppress(SealserveError):
        verify_tdx_at_time(data, now=NOW)
