"""State bound into the audit chain: versions of sealed state, and account statuses.

**Sealed state versions.** A sealed file that changes (the watermark ledger) carries a
version inside its sealed payload (:func:`wrap_versioned`); every save appends a
``sealed`` record (name, version, SHA-256 of the sealed file) after the file is
written. An older copy put back is then detected:

- at start, by the server (:func:`check_sealed_version`): the log recorded a later
  version than the file holds; it writes a signed ``alarm`` record (which fails
  ``audit verify``) and logs an error;
- by an auditor without any key (:func:`check_sealed_files`): the file's SHA-256 is an
  older recorded version than the log's last one.

A file newer than the log's last record (a crash between the write and the record) is
not an alarm; the server records its version at the next start.

**Statuses.** Every status change (detectors' and operators') is a ``status`` record.
If the state store lost them (a Redis restart without persistence), the server re-applies
the last unexpired non-normal status of each account at start
(:func:`reapply_statuses`) and records that it did.
"""

from __future__ import annotations

import hashlib
import logging
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from sealserve.defense.audit.log import AuditLog, log_files
from sealserve.defense.audit.verify import read_records
from sealserve.defense.status import AccountStatus, Status

log = logging.getLogger("sealserve.audit")

_MAGIC = b"SSVS\x01"  # sealserve versioned sealed state, layout 1
_HEAD = struct.Struct(">5sQ")
LEDGER = "watermark-ledger"


def ledger_file(worker: int | None) -> str:
    """The sealed ledger's file name in ``state_dir``: one per worker process when the
    server runs workers (one writer per file), :data:`LEDGER` otherwise."""
    return LEDGER if worker is None else f"{LEDGER}-worker-{worker}"


def ledger_files(state_dir: Path) -> list[Path]:
    """Every sealed ledger file in ``state_dir`` (the single-process one and each
    worker's), whose union is the server's ledger."""
    pattern = re.compile(rf"^{LEDGER}(-worker-[1-9][0-9]{{0,2}})?$")
    return sorted(p for p in state_dir.iterdir() if pattern.match(p.name) and p.is_file())


def wrap_versioned(version: int, payload: bytes) -> bytes:
    """The plaintext to seal: magic, version (u64), payload."""
    return _HEAD.pack(_MAGIC, version) + payload


def unwrap_versioned(blob: bytes) -> tuple[int, bytes]:
    """``(version, payload)``; a file sealed before versions existed is version 0."""
    if blob.startswith(_MAGIC) and len(blob) >= _HEAD.size:
        _, version = _HEAD.unpack_from(blob)
        return int(version), blob[_HEAD.size :]
    return 0, blob


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recorded_versions(records: Iterable[Mapping[str, Any]]) -> dict[str, list[tuple[int, str]]]:
    """Per sealed-state name, the ``(version, sha256)`` pairs the log recorded, in order."""
    out: dict[str, list[tuple[int, str]]] = {}
    for rec in records:
        if rec.get("kind") == "sealed" and isinstance(rec.get("version"), int):
            out.setdefault(str(rec.get("name")), []).append(
                (int(rec["version"]), str(rec.get("sha256")))
            )
    return out


def _scan(directory: Path, marker: bytes) -> Iterable[dict[str, Any]]:
    """The records of the log in ``directory`` whose line holds ``marker``."""
    return read_records(log_files(directory), containing=marker)


def check_sealed_version(
    audit: AuditLog, *, name: str, version: int, path: Path | None, now: float
) -> bool:
    """At start: compare sealed state ``name`` (holding ``version``) with the log.

    Writes a signed ``alarm`` and returns False when the log recorded a later version
    (the file was rolled back). Otherwise records the current version if the log does
    not hold it yet, and returns True.
    """
    seen = recorded_versions(_scan(audit.directory, b'"kind":"sealed"')).get(name, [])
    latest = max((v for v, _ in seen), default=-1)
    if latest > version:
        detail = (
            f"{name} holds version {version} but the log recorded version {latest}: an "
            "older copy was put back (rolled back); marks recorded since are lost"
        )
        log.error("audit: %s", detail)
        audit.append_alarm_at_time(now, problem="sealed state rolled back", detail=detail)
        return False
    digest = file_sha256(path) if path is not None and path.exists() else ""
    if (version, digest) not in seen and (version > 0 or digest):
        audit.append_sealed_at_time(now, name=name, version=version, sha256=digest)
    return True


def check_sealed_files(
    records: Iterable[Mapping[str, Any]], directory: Path
) -> list[tuple[bool, str]]:
    """What an auditor can check without keys: each sealed file in ``directory`` that
    the log recorded must be the last recorded version. Returns ``(fatal, message)``."""
    out: list[tuple[bool, str]] = []
    for name, seen in sorted(recorded_versions(records).items()):
        path = directory / name
        if not path.exists():
            out.append((True, f"{path} is missing; the log recorded version {seen[-1][0]}"))
            continue
        digest = file_sha256(path)
        last_version, last_digest = seen[-1]
        if digest == last_digest:
            continue
        older = [v for v, d in seen if d == digest]
        if older:
            out.append((True, (
                f"{path} is version {older[-1]} but the log recorded version {last_version} "
                "later: it was rolled back to an older copy")))  # fmt: skip
        else:
            out.append((False, (
                f"{path} matches no version the log recorded (last: {last_version}); "
                "written after the log's last record (a crash?) or replaced")))  # fmt: skip
    return out


class StatusSetter(Protocol):
    """What re-applying statuses needs of the quota guard (the audit room sits below it)."""

    def status(self, account: str, *, now: float | None = None) -> AccountStatus: ...

    def apply_status(
        self,
        account: str,
        status: Status,
        *,
        reason: str,
        set_by: str,
        factor: float | None = None,
        difficulty: int | None = None,
        ttl_s: float | None = None,
        now: float | None = None,
    ) -> AccountStatus: ...


# The detectors' labels and the store's, to one name.
_KIND = {
    "throttle": "throttled", "throttled": "throttled",
    "challenge": "challenged", "challenged": "challenged",
    "suspend": "suspended", "suspended": "suspended",
}  # fmt: skip


def latest_statuses(directory: Path) -> dict[str, dict[str, Any]]:
    """Each account's last ``status`` record in the log in ``directory``."""
    latest: dict[str, dict[str, Any]] = {}
    for rec in _scan(directory, b'"kind":"status"'):
        if rec.get("kind") == "status":
            latest[str(rec.get("account"))] = rec
    return latest


def reapply_statuses(
    audit: AuditLog,
    quota: StatusSetter,
    *,
    now: float,
    throttle_factor: float,
    challenge_difficulty: int,
) -> list[str]:
    """Re-apply statuses the state store lost; returns the accounts re-applied."""
    done: list[str] = []
    for account, rec in latest_statuses(audit.directory).items():
        kind = _KIND.get(str(rec.get("status")))
        expires = rec.get("expires_at")
        if kind is None or (isinstance(expires, int | float) and expires <= now):
            continue
        if quota.status(account, now=now).kind is not Status.NORMAL:
            continue  # the store still holds a status: it is the truth
        ttl = None if not isinstance(expires, int | float) else max(1.0, expires - now)
        reason = f"re-applied from the audit log (the state store lost it): {rec.get('reason')}"
        set_by = str(rec.get("set_by") or "detector")
        factor = rec.get("factor", throttle_factor)
        difficulty = rec.get("difficulty", challenge_difficulty)
        quota.apply_status(
            account, Status(kind), reason=reason, set_by=set_by, ttl_s=ttl, now=now,
            factor=float(factor) if kind == "throttled" else None,
            difficulty=int(difficulty) if kind == "challenged" else None,
        )  # fmt: skip
        audit.append_status_change_at_time(
            now, account=account, model=str(rec.get("model", "")), previous="normal",
            status=kind, expires_at=expires if isinstance(expires, int | float) else None,
            reason=reason, set_by=set_by,
            factor=float(factor) if kind == "throttled" else None,
            difficulty=int(difficulty) if kind == "challenged" else None,
        )  # fmt: skip
        done.append(account)
    if done:
        log.warning("audit: re-applied %d account status(es) the state store had lost: %s",
                    len(done), ", ".join(done[:10]))  # fmt: skip
    return done


def record_status(
    audit: AuditLog, account: str, status: AccountStatus, *, previous: str, now: float
) -> None:
    """Record a status an operator set (the detectors record their own)."""
    audit.append_status_change_at_time(
        now, account=account, model="", previous=previous, status=status.kind.value,
        expires_at=status.expires_at, reason=status.reason, set_by=status.set_by,
        factor=status.factor, difficulty=status.difficulty,
    )  # fmt: skip
