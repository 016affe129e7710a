"""What the SDK hands its user reads as what it is: quota as an int, measurements as
hex, a suspended account as SuspendedError (gRPC and REST alike)."""

from __future__ import annotations

import email.message
from typing import Any

import grpc
import pytest

from sealserve.attestation.claims import Claims, Platform
from sealserve.client.errors import from_rpc_error
from sealserve.client.quota import QuotaLeft
from sealserve.client.rest import from_http_error
from sealserve.errors import PermissionDeniedError, SuspendedError
from sealserve.rpc.status import to_status
from sealserve.server.grpc.servicer import format_remaining
from sealserve.server.rest.errors import to_http


def test_quota_header_parses_to_ints() -> None:
    quota = QuotaLeft.from_header("account.day=995/1000,peer.minute=58/60")
    assert quota is not None
    assert quota.remaining == 58 and isinstance(quota.remaining, int)
    assert quota.windows == {"account.day": (995, 1000), "peer.minute": (58, 60)}
    assert str(quota) == "account.day=995/1000,peer.minute=58/60"


def test_quota_header_the_server_writes_round_trips() -> None:
    from sealserve.defense.store.base import Remaining

    header = format_remaining((Remaining("account.day", limit=10, remaining=7, reset_after=1.0),))
    quota = QuotaLeft.from_header(header)
    assert quota is not None and quota.remaining == 7


@pytest.mark.parametrize("junk", ["", "garbage", "a=b/c", "a=1", "=1/2"])
def test_a_malformed_quota_header_is_no_quota(junk: str) -> None:
    assert QuotaLeft.from_header(junk) is None


def test_measurements_print_as_hex_and_stay_bytes() -> None:
    claims = Claims(
        platform=Platform.SIMULATED_SNP, report_data=bytes(64), debug=False,
        measurements={"measurement": bytes.fromhex("ab" * 48)}, fields={},
    )  # fmt: skip
    assert claims.measurements["measurement"] == bytes.fromhex("ab" * 48)
    assert str(claims.measurements) == repr({"measurement": "ab" * 48})
    assert "\\x" not in f"{claims.measurements}"
    assert claims.measurements.hex() == {"measurement": "ab" * 48}
    assert claims.measurements == {"measurement": bytes.fromhex("ab" * 48)}


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailing: Any) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailing


def test_suspension_over_grpc_is_suspended_error() -> None:
    code, message, meta = to_status(SuspendedError("account is suspended", retry_after=60))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    error = from_rpc_error(_RpcError(code, message, meta))
    assert type(error) is SuspendedError and error.message == "account is suspended"
    assert error.retry_after == 60
    code, message, meta = to_status(PermissionDeniedError("token lacks the 'infer' scope"))
    assert type(from_rpc_error(_RpcError(code, message, meta))) is PermissionDeniedError


def test_suspension_over_rest_is_suspended_error() -> None:
    from sealserve.server.rest.errors import error_body

    for exc, expected in (
        (SuspendedError("account is suspended"), SuspendedError),
        (PermissionDeniedError("token lacks the 'infer' scope"), PermissionDeniedError),
    ):
        status, message, headers = to_http(exc)
        assert status == 403
        msg = email.message.Message()
        for key, value in headers:
            msg[key.decode()] = value.decode()
        error = from_http_error(status, msg, error_body(message))  # type: ignore[arg-type]
        assert type(error) is expected and error.message == exc.message
