"""The sealed watermark ledger is written off the request path, coalesced, and at close."""

from __future__ import annotations

import threading
import time

import pytest

from sealserve.server.defenses import LedgerSaver


def test_a_mark_is_written_by_the_saver_thread() -> None:
    writes: list[str] = []
    done = threading.Event()

    def save() -> None:
        writes.append(threading.current_thread().name)
        done.set()

    saver = LedgerSaver(save, 0.05)
    saver.mark()  # the request path only sets a flag
    assert done.wait(10)
    assert writes == ["sealserve-ledger"]
    saver.close()
    assert writes == ["sealserve-ledger", threading.current_thread().name]  # last write


def test_many_marks_make_one_write() -> None:
    writes: list[int] = []
    saver = LedgerSaver(lambda: writes.append(1), 3600.0)
    for _ in range(50):
        saver.mark()
    saver.close()  # the thread was still coalescing: close writes once, the thread not
    assert writes == [1]


def test_a_failed_write_is_retried_and_close_without_marks_writes_once() -> None:
    calls = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk full")

    saver = LedgerSaver(flaky, 0.05)
    saver.mark()
    deadline = time.monotonic() + 5
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(calls) >= 2  # the first write failed, the saver tried again
    saver.close()
    quiet: list[int] = []
    LedgerSaver(lambda: quiet.append(1), 1.0).close()
    assert quiet == [1]


def test_interval_must_be_positive() -> None:
    from sealserve.defense.config import DefenseConfig
    from sealserve.errors import ConfigError

    with pytest.raises(ConfigError, match="ledger_save_interval_s"):
        DefenseConfig.parse({"ledger_save_interval_s": 0})
