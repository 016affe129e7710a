"""Verify an audit log written by :class:`sealserve.defense.audit.log.AuditLog`.

Over 400 lines: the numbered checks of one file format, kept in their order.

Steps, per record in file order (files in the order given, which is chain order):

1. The line parses as a canonical ``sealserve-audit/2`` record carrying a ``_mac``
   (checked too when the MAC key is given: only the server holds it).
2. ``seq`` is one more than the previous record's (else records were removed,
   inserted or reordered; across files: a file is missing).
3. ``prev`` equals the SHA-256 of the previous record's line (else that record was
   edited). The first record supplied must be the ``open`` record (seq 0, ``prev`` of
   zeros): a missing first file fails, unless earlier files are knowingly left out
   (``allow_missing_start``: a warning then).
4. Each file after the first starts with a ``rotate`` record naming the previous file.
5. A ``checkpoint`` names a trusted key's fingerprint, covers exactly the records
   since the previous checkpoint, and its Ed25519 signature verifies.
6. What the server reported about itself: a ``resume`` record with ``mac_failures``
   (records rewritten while it was stopped) or an ``alarm`` (rolled-back sealed state)
   fails; a torn record moved aside, and recovered unsigned records, are warnings.
7. With an expected head (``--expect-head``): record ``seq`` exists and its line
   hashes to the head's hash (else the log was cut short or rewritten below a point
   the auditor saw); a signed head's signature verifies.
8. Records after the last checkpoint are not covered by any signature: a failure
   naming the first of them, or a warning with ``allow_unsigned_tail``.

What each party can detect (docs/detection-audit.md has the table): anyone with the
public key detects edits, reordering and gaps in signed records, a missing first or
middle file, and what the server reported; only an auditor holding a head (or the
server itself, with the MAC key, on restart) detects a log cut at a checkpoint (a
deleted last file included) or a stopped server's unsigned tail dropped or rewritten.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealserve.canonical import canonical_json
from sealserve.defense.audit.head import AuditHead
from sealserve.defense.audit.log import (
    GENESIS,
    VERSION,
    mac_ok,
    public_key_fingerprint,
    sha256_hex,
    signing_payload,
    split_mac,
    verify_signature,
)
from sealserve.errors import AuditError, ConfigError


@dataclass(frozen=True, slots=True)
class AuditProblem:
    """The first bad record: where it is and what is wrong with it."""

    file: str
    line: int
    seq: int | None
    problem: str

    def __str__(self) -> str:
        which = f"record {self.seq}" if self.seq is not None else "record"
        return f"{self.file}:{self.line}: {which}: {self.problem}"


@dataclass(frozen=True, slots=True)
class AuditReport:
    """What verification found. ``problem`` is None when the log is intact."""

    files: tuple[str, ...]
    records: int
    checkpoints: int
    first_seq: int | None
    last_seq: int | None
    last_signed_seq: int | None
    key_fingerprints: tuple[str, ...]
    unsigned_tail: int
    head_hash: str | None = None
    warnings: tuple[str, ...] = ()
    problem: AuditProblem | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def summary(self) -> str:
        status = "OK" if self.ok else f"FAILED at {self.problem}"
        return (
            f"audit log {status}: {self.records} records (seq {self.first_seq}..{self.last_seq}) "
            f"in {len(self.files)} file(s), {self.checkpoints} signed checkpoint(s), last "
            f"signed seq {self.last_signed_seq}, keys {', '.join(self.key_fingerprints) or '-'}; "
            f"head {self.last_seq}:{self.head_hash or '-'}"
        )


@dataclass
class _State:
    files: list[str] = field(default_factory=list)
    records: int = 0
    checkpoints: int = 0
    first_seq: int | None = None
    prev_seq: int | None = None
    prev_hash: str | None = None
    prev_where: tuple[str, int] = ("", 0)
    covers_from: int | None = None
    last_signed: int | None = None
    first_unsigned: tuple[str, int, int] | None = None
    keys: set[str] = field(default_factory=set)
    warnings: list[str] = field(default_factory=list)
    allow_missing_start: bool = False
    mac_key: bytes | None = None
    expect: AuditHead | None = None
    expect_seen: bool = False


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        with open(path, "rb") as fh:
            yield from enumerate(fh, start=1)
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc}", file=str(path)) from exc


def check_audit_log(
    paths: Sequence[str | os.PathLike[str]],
    *,
    trusted_public_keys: Iterable[bytes],
    allow_unsigned_tail: bool = False,
    allow_missing_start: bool = False,
    expect_head: AuditHead | None = None,
    mac_key: bytes | None = None,
) -> AuditReport:
    """Check the log files ``paths`` (in chain order) and report the first problem.

    ``trusted_public_keys`` are raw 32-byte Ed25519 public keys (see
    ``audit.load_public_key``). ``expect_head``: a head the auditor saw (step 7).
    ``mac_key``: the server's MAC key (the server's own check; auditors lack it).
    Raises ``ConfigError`` if no key or file is given and ``AuditError`` if a file
    cannot be read or the expected head's signature does not verify; problems in the
    log itself are returned in ``AuditReport.problem``.
    """
    trusted = {public_key_fingerprint(bytes(k)): bytes(k) for k in trusted_public_keys}
    if not trusted:
        raise ConfigError("audit verification needs at least one trusted public key")
    if not paths:
        raise ConfigError("audit verification needs at least one log file")
    st = _State(allow_missing_start=allow_missing_start, mac_key=mac_key, expect=expect_head)
    if expect_head is not None:
        if expect_head.signed:
            expect_head.verify(trusted)
        else:
            st.warnings.append(
                f"expected head {expect_head.seq} is unsigned: taken on the auditor's word"
            )
    problem: AuditProblem | None = None
    for index, p in enumerate(paths):
        path = Path(p)
        st.files.append(str(path))
        first_in_file = True
        for number, raw in _lines(path):
            problem = _check_record(st, str(path), number, raw, index, first_in_file, trusted)
            first_in_file = False
            if problem is not None:
                break
        if problem is not None:
            break
        if first_in_file:
            problem = AuditProblem(str(path), 0, None, "file is empty")
            break
    if problem is None and st.expect is not None and not st.expect_seen:
        e, last = st.expect, st.prev_seq
        f, line = st.prev_where
        if last is not None and e.seq > last:
            msg = (
                f"the log ends at seq {last} but the expected head is seq {e.seq}: "
                f"{e.seq - last} record(s) were cut off (a truncated or deleted last file)"
            )
        else:
            msg = (
                f"the expected head seq {e.seq} is not in the records supplied (they start "
                f"at seq {st.first_seq})"
            )
        problem = AuditProblem(f, line, last, msg)
    if problem is None and st.first_unsigned is not None:
        f, line, seq = st.first_unsigned
        msg = (
            f"{st.records - _signed_count(st)} record(s) from here on follow the last signed "
            f"checkpoint (seq {st.last_signed}) and are not covered by any signature"
        )
        if allow_unsigned_tail:
            st.warnings.append(f"{f}:{line}: record {seq}: {msg}")
        else:
            problem = AuditProblem(f, line, seq, msg)
    return AuditReport(
        files=tuple(st.files),
        records=st.records,
        checkpoints=st.checkpoints,
        first_seq=st.first_seq,
        last_seq=st.prev_seq,
        last_signed_seq=st.last_signed,
        key_fingerprints=tuple(sorted(st.keys)),
        unsigned_tail=0 if st.first_unsigned is None else st.records - _signed_count(st),
        head_hash=st.prev_hash,
        warnings=tuple(st.warnings),
        problem=problem,
    )


def _signed_count(st: _State) -> int:
    if st.last_signed is None or st.first_seq is None:
        return 0
    return st.last_signed - st.first_seq + 1


def _check_record(
    st: _State,
    file: str,
    line: int,
    raw: bytes,
    file_index: int,
    first_in_file: bool,
    trusted: dict[str, bytes],
) -> AuditProblem | None:
    def bad(msg: str, seq: int | None = None) -> AuditProblem:
        return AuditProblem(file, line, seq, msg)

    # 1. parse
    if not raw.endswith(b"\n"):
        return bad("incomplete last line (truncated write or edit)")
    body = raw[:-1]
    try:
        rec: Any = json.loads(body)
    except ValueError:
        return bad("not valid JSON")
    if not isinstance(rec, dict) or rec.get("v") != VERSION:
        return bad(f"not a sealserve-audit/{VERSION} record")
    seq, kind, prev = rec.get("seq"), rec.get("kind"), rec.get("prev")
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(kind, str):
        return bad("record lacks an integer seq or a kind")
    if split_mac(body) is None:
        return bad("record carries no MAC", seq)
    if not isinstance(prev, str) or not isinstance(rec.get("time"), int | float):
        return bad("record lacks prev or time", seq)
    try:
        if canonical_json(rec) != body:
            return bad("record is not in canonical form (edited by hand?)", seq)
    except ValueError:
        return bad("record holds values JSON cannot represent", seq)
    if st.mac_key is not None and not mac_ok(st.mac_key, body):
        return bad("record's MAC does not verify: written without the server's key", seq)
    # 2-3. position and link
    if st.prev_seq is None:
        st.first_seq = seq
        if kind == "open":
            if seq != 0 or prev != GENESIS:
                return bad("open record must have seq 0 and an all-zero prev", seq)
        elif st.allow_missing_start:
            st.warnings.append(
                f"{file}:{line}: chain starts at seq {seq}; earlier records were not supplied"
            )
        else:
            return bad(
                f"the log starts at seq {seq}, not with its open record (seq 0): its first "
                "file(s) are missing (pass them, or --allow-missing-start if left out on purpose)",
                seq,
            )
        st.covers_from = seq
    else:
        expected = st.prev_seq + 1
        if seq != expected:
            where = "a file is missing or " if first_in_file else ""
            return bad(
                f"seq {seq} where {expected} was expected: {where}records were removed, "
                "inserted or reordered",
                seq,
            )
        if prev != st.prev_hash:
            pf, pl = st.prev_where
            return AuditProblem(
                pf,
                pl,
                st.prev_seq,
                f"record was edited: its SHA-256 does not match the prev hash carried by "
                f"record {seq} ({file}:{line})",
            )
    # 4. file boundaries
    if first_in_file and file_index > 0:
        prev_file = Path(st.files[-2]).name
        if kind != "rotate" or rec.get("previous_file") != prev_file:
            return bad(f"file does not start with a rotate record following {prev_file}", seq)
    # 5. checkpoints
    if kind == "checkpoint":
        fp = rec.get("key")
        if fp not in trusted:
            return bad(f"checkpoint signed by an untrusted key {fp!r}", seq)
        if rec.get("covers_from") != st.covers_from or rec.get("records") != seq - (
            st.covers_from or 0
        ):
            return bad("checkpoint does not cover exactly the records since the last one", seq)
        try:
            sig = base64.b64decode(str(rec.get("sig", "")), validate=True)
        except (binascii.Error, ValueError):
            return bad("checkpoint signature is not base64", seq)
        if not verify_signature(trusted[fp], sig, signing_payload(rec)):
            return bad("checkpoint signature does not verify", seq)
        st.checkpoints += 1
        st.keys.add(fp)
        st.last_signed = seq
        st.first_unsigned = None
        st.covers_from = seq + 1
    elif st.first_unsigned is None:
        st.first_unsigned = (file, line, seq)
    # 6. what the server reported about itself
    reported = _reported(rec)
    if reported is not None:
        fatal, message = reported
        if fatal:
            return bad(message, seq)
        st.warnings.append(f"{file}:{line}: record {seq}: {message}")
    # 7. the expected head
    if st.expect is not None and seq == st.expect.seq:
        st.expect_seen = True
        if sha256_hex(body) != st.expect.hash:
            return bad(
                f"record differs from the expected head ({st.expect.hash[:16]}...): the log "
                "was rewritten from here on, or cut short and continued",
                seq,
            )
    st.records += 1
    st.prev_seq = seq
    st.prev_hash = sha256_hex(body)
    st.prev_where = (file, line)
    return None


def _reported(rec: dict[str, Any]) -> tuple[bool, str] | None:
    """(fatal, message) for what a ``resume`` or ``alarm`` record reports, else None."""
    kind = rec.get("kind")
    if kind == "alarm":
        return True, f"the server raised an alarm: {rec.get('problem')}: {rec.get('detail')}"
    if kind != "resume":
        return None
    if rec.get("mac_failures"):
        return True, (
            f"on restart the server found {rec.get('mac_failures')} of {rec.get('recovered')} "
            f"unsigned record(s) from seq {rec.get('first_bad_seq')} whose MAC did not verify: "
            "the log was rewritten while the server was stopped"
        )
    parts = []
    if rec.get("torn_bytes"):
        parts.append(
            f"a torn last record ({rec.get('torn_bytes')} bytes) was moved aside to "
            f"{rec.get('torn_file')}"
        )
    if rec.get("recovered"):
        parts.append(
            f"{rec.get('recovered')} unsigned record(s) from seq {rec.get('recovered_from')} "
            "were recovered after a crash (MACs verified by the server, then signed)"
        )
    return (False, "; ".join(parts)) if parts else None


def verify_audit_log(
    paths: Sequence[str | os.PathLike[str]],
    *,
    trusted_public_keys: Iterable[bytes],
    allow_unsigned_tail: bool = False,
    allow_missing_start: bool = False,
    expect_head: AuditHead | None = None,
    mac_key: bytes | None = None,
) -> AuditReport:
    """Verify the log and return its report; raise ``AuditError`` naming the first bad
    record (file, line, seq, problem) if there is one. See :func:`check_audit_log`."""
    report = check_audit_log(
        paths,
        trusted_public_keys=trusted_public_keys,
        allow_unsigned_tail=allow_unsigned_tail,
        allow_missing_start=allow_missing_start,
        expect_head=expect_head,
        mac_key=mac_key,
    )
    if report.problem is not None:
        p = report.problem
        raise AuditError(
            f"audit log verification failed: {p}",
            file=p.file,
            line=p.line,
            seq=p.seq,
            problem=p.problem,
        )
    return report


def read_records(
    paths: Sequence[str | os.PathLike[str]], *, containing: bytes = b""
) -> Iterator[dict[str, Any]]:
    """Parse the records of ``paths`` without verifying them (for reports); lines that
    are not JSON objects are skipped, and so are lines without ``containing`` (a cheap
    filter before parsing, e.g. ``b'"kind":"status"'``)."""
    for p in paths:
        for _, raw in _lines(Path(p)):
            if containing not in raw:
                continue
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec
