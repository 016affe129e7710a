"""Process hardening, each step checked in a subprocess so this process is untouched."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from sealserve.enclave import hardening
from sealserve.enclave.hardening import HardeningReport, harden_process
from tests.conftest import ROOT, sealserve_env

PR_CAPBSET_DROP = 24
CAP_IPC_LOCK = 14

PROBE = textwrap.dedent(
    """
    import ctypes, json, resource, sys
    from sealserve.enclave.hardening import harden_process
    {setup}
    report = harden_process()
    libc = ctypes.CDLL(None, use_errno=True)
    locked = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmLck:")]
    print(json.dumps({{
        "report": report.to_json(),
        "core": list(resource.getrlimit(resource.RLIMIT_CORE)),
        "dumpable": libc.prctl(3, 0, 0, 0, 0),
        "vmlck_kb": int(locked[0]),
    }}))
    """
)


def _drop_cap_ipc_lock() -> None:
    # Root holds CAP_IPC_LOCK, which ignores RLIMIT_MEMLOCK; drop it from the bounding
    # set so the exec'd child lacks it, as an ordinary service user would.
    if os.geteuid() == 0:
        ctypes.CDLL(None, use_errno=True).prctl(PR_CAPBSET_DROP, CAP_IPC_LOCK, 0, 0, 0)


def run_probe(setup: str = "", *, drop_ipc_lock: bool = False) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(setup=setup)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=sealserve_env(),
        check=True,
        preexec_fn=_drop_cap_ipc_lock if drop_ipc_lock else None,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def steps(result: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {s["name"]: s for s in result["report"]}


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux steps")


def test_core_dumps_off_and_not_dumpable() -> None:
    result = run_probe()
    # The subprocess changed, this test process did not.
    assert ctypes.CDLL(None).prctl(hardening.PR_GET_DUMPABLE, 0, 0, 0, 0) == 1
    assert steps(result)["no_core_dumps"]["status"] == "applied"
    assert result["core"] == [0, 0]
    assert steps(result)["not_dumpable"]["status"] == "applied"
    assert result["dumpable"] == 0


def test_memory_locked_when_permitted() -> None:
    result = run_probe(
        "resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY,) * 2)"
        if resource.getrlimit(resource.RLIMIT_MEMLOCK)[1] == resource.RLIM_INFINITY
        else ""
    )
    step = steps(result)["memory_locked"]
    if step["status"] == "applied":
        assert result["vmlck_kb"] > 0
        assert step["detail"] == "mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)"
    else:  # an unprivileged runner with a finite limit: the warning path, checked below
        assert step["status"] == "skipped" and "RLIMIT_MEMLOCK" in step["detail"]
        assert result["vmlck_kb"] == 0


LAZY_PROBE = textwrap.dedent(
    """
    import json, mmap, resource
    from sealserve.enclave.hardening import harden_process
    if resource.getrlimit(resource.RLIMIT_MEMLOCK)[1] == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY,) * 2)
    def rss_kb():
        return int([l.split()[1] for l in open("/proc/self/status")
                    if l.startswith("VmRSS:")][0])
    report = harden_process()
    before = rss_kb()
    mapped = mmap.mmap(-1, 256 << 20)    # mapped, never touched
    mapped_rss = rss_kb()
    mapped[: 8 << 20] = b"s" * (8 << 20)  # touched: these pages are locked
    locked = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmLck:")]
    print(json.dumps({"report": report.to_json(), "before": before,
                      "mapped": mapped_rss, "touched": rss_kb(), "vmlck_kb": locked[0]}))
    """
)


def test_locked_memory_is_made_resident_only_when_touched() -> None:
    # The eager MCL_FUTURE faulted in every mapped page (hundreds of MiB for a 20 KB
    # model); MCL_ONFAULT locks pages as they are touched, so mapping costs nothing.
    out = subprocess.run(
        [sys.executable, "-c", LAZY_PROBE], capture_output=True, text=True, cwd=ROOT,
        env=sealserve_env(), check=True,
    )  # fmt: skip
    result = json.loads(out.stdout)
    step = steps(result)["memory_locked"]
    if step["status"] != "applied":  # an unprivileged runner: nothing locked at all
        assert "RLIMIT_MEMLOCK" in step["detail"]
        return
    assert result["mapped"] - result["before"] < 16 << 10  # KiB: not the 256 MiB mapped
    assert result["touched"] - result["before"] >= 8 << 10
    assert result["vmlck_kb"] >= 8 << 10  # what was touched is locked


def test_kernel_without_onfault_falls_back_to_eager_lock(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    class OldLibc:
        def mlockall(self, flags: int) -> int:
            calls.append(flags)
            if flags & hardening.MCL_ONFAULT:
                ctypes.set_errno(errno.EINVAL)
                return -1
            return 0

    monkeypatch.setattr(hardening, "_libc", OldLibc)
    monkeypatch.setattr(hardening, "_has_cap_ipc_lock", lambda: True)
    step = hardening._memory_locked()
    assert calls == [7, 3]
    assert step.status == "applied"
    assert step.detail == "mlockall(MCL_CURRENT | MCL_FUTURE): MCL_ONFAULT refused (kernel < 4.4?)"
    assert "MCL_ONFAULT refused (kernel < 4.4?); locked every mapped page instead" in caplog.text


def test_mlockall_refused_is_skipped_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoLock:
        def mlockall(self, flags: int) -> int:
            ctypes.set_errno(errno.EPERM)
            return -1

    monkeypatch.setattr(hardening, "_libc", NoLock)
    monkeypatch.setattr(hardening, "_has_cap_ipc_lock", lambda: True)
    step = hardening._memory_locked()
    assert step.status == "skipped"
    assert step.detail == f"mlockall: {os.strerror(errno.EPERM)}"


def test_low_memlock_limit_warns_and_does_not_fail() -> None:
    result = run_probe(
        "resource.setrlimit(resource.RLIMIT_MEMLOCK, (65536, 65536))", drop_ipc_lock=True
    )
    step = steps(result)["memory_locked"]
    assert step["status"] == "skipped"
    assert "RLIMIT_MEMLOCK is 65536 bytes and CAP_IPC_LOCK is not held" in step["detail"]
    assert result["vmlck_kb"] == 0
    # The other protections still applied.
    assert result["core"] == [0, 0] and result["dumpable"] == 0


def test_lock_memory_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(
        hardening,
        "_no_core_dumps",
        lambda: calls.append("core") or hardening.HardeningStep("no_core_dumps", "applied", "x"),
    )
    monkeypatch.setattr(
        hardening,
        "_not_dumpable",
        lambda: calls.append("dump") or hardening.HardeningStep("not_dumpable", "applied", "x"),
    )
    report = harden_process(lock_memory=False)
    assert calls == ["core", "dump"]
    assert report.step("memory_locked").status == "skipped"
    assert report.step("memory_locked").detail == "disabled by configuration"
    assert not report.all_applied


def test_unsupported_off_linux(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(hardening.sys, "platform", "darwin")
    report = harden_process()
    assert [s.status for s in report.steps] == ["unsupported"] * 3
    assert report.to_json()[0] == {
        "name": "no_core_dumps",
        "status": "unsupported",
        "detail": "not implemented on darwin",
    }
    assert "process hardening: memory_locked unsupported" in caplog.text


def test_report_lookup() -> None:
    report = HardeningReport((hardening.HardeningStep("a", "applied", "ok"),))
    assert report.all_applied and report.step("a").detail == "ok"
    with pytest.raises(KeyError):
        report.step("b")
