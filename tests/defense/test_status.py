"""One status vocabulary: ordered by severity, one word stored, one label in policies."""

from __future__ import annotations

import pytest

from sealserve.defense.status import DEFAULT_DIFFICULTY, AccountStatus, Status
from sealserve.errors import ConfigError


def test_order_is_severity_not_spelling() -> None:
    # Alphabetically "suspended" < "throttled"; by severity it is the other way round.
    assert Status.SUSPENDED > Status.THROTTLED > Status.NORMAL
    assert Status.CHALLENGED < Status.SUSPENDED
    assert sorted(Status, reverse=True)[0] is Status.SUSPENDED
    assert max(Status.THROTTLED, Status.CHALLENGED) is Status.CHALLENGED


def test_stored_word_and_policy_label() -> None:
    assert [s.value for s in Status] == ["normal", "throttled", "challenged", "suspended"]
    assert [s.label for s in Status] == ["ok", "throttle", "challenge", "suspend"]
    assert Status.parse("Throttle") is Status.THROTTLED
    with pytest.raises(ConfigError, match="unknown account status 'ban'"):
        Status.parse("ban")


def test_make_fills_parameters_and_expiry_lapses() -> None:
    st = AccountStatus.make(Status.THROTTLED, expires_at=10.0)
    assert (st.factor, st.difficulty) == (0.1, None)
    assert AccountStatus.make(Status.CHALLENGED).difficulty == DEFAULT_DIFFICULTY == 17
    assert st.effective_at_time(9.9) is Status.THROTTLED
    assert st.effective_at_time(10.0) is Status.NORMAL
    assert AccountStatus.make(Status.NORMAL, expires_at=5.0).expires_at is None
    assert AccountStatus.from_json(st.to_json()) == st
