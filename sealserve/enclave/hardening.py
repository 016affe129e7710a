"""Process hardening at server start: no core dumps, not dumpable, memory locked.

Memory is locked with ``mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`` (Linux >= 4.4):
every page the process touches, secrets included, is locked as it is faulted in and can
never be swapped, but pages it merely maps (thread stacks, arenas, libraries' unused
code) are not made resident. Without ``MCL_ONFAULT`` the kernel faults in the whole
address space at once, which costs hundreds of MiB for a small model. A kernel that
refuses ``MCL_ONFAULT`` (EINVAL) gets the eager lock, and the step's detail says why.

Each step is reported (for the workload manifest) rather than raised: the server
decides what it requires. A step's status is one of

- ``applied``      the protection is in force;
- ``skipped``      not permitted here (e.g. RLIMIT_MEMLOCK too low), a warning is logged;
- ``failed``       the call failed unexpectedly, a warning is logged;
- ``unsupported``  not available on this operating system.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import sys
from dataclasses import dataclass
from typing import Literal

if sys.platform != "win32":  # imported up front: a process may drop privileges later
    import resource

log = logging.getLogger(__name__)

Status = Literal["applied", "skipped", "failed", "unsupported"]

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4  # Linux >= 4.4
_CAP_IPC_LOCK = 14


@dataclass(frozen=True)
class HardeningStep:
    """The outcome of one hardening step."""

    name: str
    status: Status
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail}


@dataclass(frozen=True)
class HardeningReport:
    """Every step's outcome, in order."""

    steps: tuple[HardeningStep, ...]

    def step(self, name: str) -> HardeningStep:
        """The step called ``name``; raises ``KeyError`` if there is none."""
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def all_applied(self) -> bool:
        return all(s.status == "applied" for s in self.steps)

    def to_json(self) -> list[dict[str, str]]:
        """The report as the workload manifest records it."""
        return [s.to_json() for s in self.steps]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _no_core_dumps() -> HardeningStep:
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        return HardeningStep("no_core_dumps", "failed", f"setrlimit(RLIMIT_CORE, 0): {exc}")
    return HardeningStep("no_core_dumps", "applied", "RLIMIT_CORE = 0")


def _not_dumpable() -> HardeningStep:
    libc = _libc()
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        return HardeningStep(
            "not_dumpable", "failed", f"prctl(PR_SET_DUMPABLE): {os.strerror(err)}"
        )
    now = libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    if now != 0:
        return HardeningStep("not_dumpable", "failed", f"PR_GET_DUMPABLE still {now}")
    return HardeningStep("not_dumpable", "applied", "PR_SET_DUMPABLE = 0")


def _has_cap_ipc_lock() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_IPC_LOCK & 1)
    except OSError:
        pass
    return False


def _memory_locked() -> HardeningStep:
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    # With a finite limit and no CAP_IPC_LOCK, MCL_FUTURE would make every allocation
    # beyond the limit fail later (loading a model, say): skip rather than break.
    if soft != resource.RLIM_INFINITY and not _has_cap_ipc_lock():
        return HardeningStep(
            "memory_locked",
            "skipped",
            f"RLIMIT_MEMLOCK is {soft} bytes and CAP_IPC_LOCK is not held; memory may be "
            "swapped (raise the limit, e.g. LimitMEMLOCK=infinity, to lock it)",
        )
    libc = _libc()
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) == 0:
        return HardeningStep(
            "memory_locked", "applied", "mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)"
        )
    err = ctypes.get_errno()
    if err != errno.EINVAL:
        return HardeningStep("memory_locked", "skipped", f"mlockall: {os.strerror(err)}")
    # An old kernel (< 4.4) that does not know MCL_ONFAULT: lock eagerly, which makes the
    # whole address space resident, and say so.
    reason = "MCL_ONFAULT refused (kernel < 4.4?)"
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        err = ctypes.get_errno()
        return HardeningStep("memory_locked", "skipped", f"{reason}; mlockall: {os.strerror(err)}")
    log.warning("process hardening: %s; locked every mapped page instead", reason)
    return HardeningStep(
        "memory_locked", "applied", f"mlockall(MCL_CURRENT | MCL_FUTURE): {reason}"
    )


def harden_process(*, lock_memory: bool = True) -> HardeningReport:
    """Apply every hardening step to this process and report each outcome.

    Irreversible for the process (it stays non-dumpable, without core dumps, and with
    its memory locked). Never raises: a step that cannot be applied is reported as
    ``skipped``/``failed`` and logged as a warning, or ``unsupported`` off Linux.
    ``lock_memory=False`` leaves memory unlocked and reports the step as skipped.
    """
    if not sys.platform.startswith("linux"):
        steps = tuple(
            HardeningStep(name, "unsupported", f"not implemented on {sys.platform}")
            for name in ("no_core_dumps", "not_dumpable", "memory_locked")
        )
    else:
        memory = (
            _memory_locked()
            if lock_memory
            else HardeningStep("memory_locked", "skipped", "disabled by configuration")
        )
        steps = (_no_core_dumps(), _not_dumpable(), memory)
    for s in steps:
        if s.status != "applied":
            log.warning("process hardening: %s %s: %s", s.name, s.status, s.detail)
    return HardeningReport(steps)
