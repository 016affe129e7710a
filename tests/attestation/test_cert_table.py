"""The kernel auxblob cert table, and fuzzing every parser of untrusted bytes."""

from __future__ import annotations

import contextlib
import struct
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealserve.attestation.evidence import Evidence
from sealserve.attestation.snp import REPORT_SIZE, SnpReport
from sealserve.attestation.snp_certs import (
    ARK_GUID,
    ASK_GUID,
    VCEK_GUID,
    VLEK_GUID,
    CertTable,
)
from sealserve.errors import EvidenceFormatError, SealserveError
from tests.attestation.conftest import read_vector

ENTRY = struct.Struct("<16sII")


def test_guids_are_the_ghcb_values() -> None:
    assert str(VCEK_GUID) == "63da758d-e664-4564-adc5-f4b93be8accd"
    assert str(VLEK_GUID) == "a8074bc2-a25a-483e-aae6-39c045a0b8a1"
    assert str(ASK_GUID) == "4ab7b379-bbac-4fe4-a02f-05aef327c782"
    assert str(ARK_GUID) == "c0b406a4-a803-4952-9743-3fb6014cd0ae"


def test_build_and_parse_round_trip() -> None:
    table = CertTable.build({VCEK_GUID: b"vcek-der", ASK_GUID: b"ask", ARK_GUID: b"ark!"})
    data = table.to_bytes()
    # layout: 3 entries + zero terminator, then the certificates in order
    assert data[: ENTRY.size] == ENTRY.pack(VCEK_GUID.bytes, 4 * ENTRY.size, 8)
    assert data[3 * ENTRY.size : 4 * ENTRY.size] == bytes(ENTRY.size)
    assert data[4 * ENTRY.size :] == b"vcek-derask" + b"ark!"
    parsed = CertTable.from_bytes(data)
    assert parsed == table
    assert parsed.get(ASK_GUID) == b"ask" and parsed.get(VLEK_GUID) is None


def test_empty_table_is_just_a_terminator() -> None:
    assert CertTable.build({}).to_bytes() == bytes(24)
    assert CertTable.from_bytes(bytes(24)).entries == ()


def test_unknown_guids_are_kept_but_unused() -> None:
    other = uuid.UUID(int=12345)
    parsed = CertTable.from_bytes(CertTable.build({other: b"x", VCEK_GUID: b"v"}).to_bytes())
    assert parsed.get(other) == b"x" and parsed.get(VCEK_GUID) == b"v"


def _bad(data: bytes, match: str) -> None:
    with pytest.raises(EvidenceFormatError, match=match) as err:
        CertTable.from_bytes(data)
    assert err.value.check == "cert_table"


def test_truncated_and_unterminated_tables() -> None:
    good = CertTable.build({VCEK_GUID: b"abc"}).to_bytes()
    _bad(b"", "no all-zero terminating entry")
    _bad(good[:30], "no all-zero terminating entry")
    _bad(good[:-1], "lies outside the certificate data")
    _bad(ENTRY.pack(VCEK_GUID.bytes, 24, 3), "no all-zero terminating entry")


def test_entries_pointing_outside_or_into_the_table() -> None:
    head = ENTRY.pack(VCEK_GUID.bytes, 0, 10) + bytes(24) + b"0123456789"
    _bad(head, "lies outside")  # offset 0 overlaps the table itself
    _bad(ENTRY.pack(VCEK_GUID.bytes, 48, 0) + bytes(24), "lies outside")  # empty entry
    _bad(ENTRY.pack(VCEK_GUID.bytes, 48, 1 << 31) + bytes(24) + b"x", "lies outside")


def test_duplicate_guid_is_refused() -> None:
    data = (
        ENTRY.pack(VCEK_GUID.bytes, 72, 1) + ENTRY.pack(VCEK_GUID.bytes, 73, 1) + bytes(24) + b"ab"
    )
    _bad(data, "appears twice")


def test_too_many_entries() -> None:
    entries = b"".join(ENTRY.pack(uuid.UUID(int=i + 1).bytes, 0, 0) for i in range(70))
    _bad(entries + bytes(24), "more than 64 entries")


# --- fuzzing: only SealserveError subclasses may escape --------------------------------

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GENUINE = read_vector("sev-snp/trustee/test-vlek-report.bin")


@FUZZ
@given(st.binary(max_size=2 * REPORT_SIZE))
def test_fuzz_report_parser_random(data: bytes) -> None:
    with contextlib.suppress(SealserveError):
        SnpReport.from_bytes(data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, REPORT_SIZE - 1), st.integers(0, 255)), max_size=16))
def test_fuzz_report_parser_mutations(edits: list[tuple[int, int]]) -> None:
    buf = bytearray(GENUINE)
    for pos, value in edits:
        buf[pos] = value
    try:
        report = SnpReport.from_bytes(bytes(buf))
    except EvidenceFormatError as exc:
        assert exc.check
        return
    assert isinstance(report.fields(), dict)


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_cert_table_random(data: bytes) -> None:
    with contextlib.suppress(SealserveError):
        CertTable.from_bytes(data)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from([VCEK_GUID, VLEK_GUID, ASK_GUID, ARK_GUID, uuid.UUID(int=0)]),
            st.integers(0, 300),
            st.integers(0, 300),
        ),
        max_size=5,
    ),
    st.binary(max_size=300),
)
def test_fuzz_cert_table_structured(entries: list[tuple[uuid.UUID, int, int]], tail: bytes) -> None:
    data = b"".join(ENTRY.pack(g.bytes, o, n) for g, o, n in entries) + bytes(24) + tail
    try:
        table = CertTable.from_bytes(data)
    except SealserveError:
        return
    assert CertTable.from_bytes(table.to_bytes()) == table


@FUZZ
@given(st.binary(max_size=256))
def test_fuzz_evidence_parser(data: bytes) -> None:
    with contextlib.suppress(SealserveError):
        Evidence.from_bytes(b"SSEV\x02" + data)
