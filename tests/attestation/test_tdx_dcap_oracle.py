"""Differential test: sealserve's TDX verification against dcap-qvl (Phala's Rust DCAP
quote verification library, offline) on the quote + collateral vector. Both must agree
on the TCB status and advisories, and both must refuse every edited or stale input."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from typing import Any

import dcap_qvl
import pytest

from sealserve.attestation.tdx import verify_tdx_at_time
from sealserve.attestation.tdx_collateral import TdxCollateral
from sealserve.errors import AttestationError

from ._tdx_util import DCAP_COLLATERAL, DCAP_QUOTE, NOW_DCAP

QUOTE = DCAP_QUOTE.read_bytes()
DOC: dict[str, str] = json.loads(DCAP_COLLATERAL.read_text())


def _ours(doc: dict[str, str], now: datetime.datetime) -> tuple[str, list[str]]:
    collateral = TdxCollateral.from_dcap_json(json.dumps(doc))
    claims = verify_tdx_at_time(QUOTE, now=now, collateral=collateral)
    assert claims.fields["collateral_verified"] is True
    return claims.fields["tcb_status"], sorted(claims.fields["tcb_advisory_ids"])


def _oracle(doc: dict[str, str], now: datetime.datetime) -> tuple[str, list[str]]:
    collateral = dcap_qvl.QuoteCollateralV3.from_json(json.dumps(doc))
    report = dcap_qvl.verify(QUOTE, collateral, int(now.timestamp()))
    return report.status, sorted(report.advisory_ids)


def test_both_say_up_to_date_with_the_same_advisories() -> None:
    ours = _ours(DOC, NOW_DCAP)
    assert ours == _oracle(DOC, NOW_DCAP)
    assert ours == ("UpToDate", [])


def _flip_hex_tail(s: str) -> str:
    return s[:-1] + ("0" if s[-1] != "0" else "1")


EDITS: dict[str, tuple[str, Callable[[str], str]]] = {
    "tcb info body": ("tcb_info", lambda s: s.replace('"pceId":"0000"', '"pceId":"0001"')),
    "tcb info level": ("tcb_info", lambda s: s.replace('"isvsvn":3', '"isvsvn":2', 1)),
    "qe identity body": ("qe_identity", lambda s: s.replace('"isvprodid":2', '"isvprodid":3')),
    "tcb info signature": ("tcb_info_signature", _flip_hex_tail),
    "qe identity signature": ("qe_identity_signature", _flip_hex_tail),
    "pck crl": ("pck_crl", _flip_hex_tail),
    "root ca crl": ("root_ca_crl", _flip_hex_tail),
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_both_refuse_an_edited_byte(name: str) -> None:
    key, edit = EDITS[name]
    doc: dict[str, Any] = {**DOC, key: edit(DOC[key])}
    assert doc[key] != DOC[key]
    with pytest.raises(AttestationError):
        _ours(doc, NOW_DCAP)
    with pytest.raises(Exception):
        _oracle(doc, NOW_DCAP)


@pytest.mark.parametrize(
    "now",
    [
        datetime.datetime(2025, 6, 19, 9, tzinfo=datetime.UTC),  # before the PCK CRL
        datetime.datetime(2025, 7, 25, tzinfo=datetime.UTC),  # after every nextUpdate
        datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC),
    ],
)
def test_both_refuse_collateral_outside_its_window(now: datetime.datetime) -> None:
    with pytest.raises(AttestationError):
        _ours(DOC, now)
    with pytest.raises(Exception):
        _oracle(DOC, now)
