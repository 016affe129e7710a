"""Verify an audit log written by :class:`sealserve.defense.audit.log.AuditLog`.

Steps, per record in file order (files in the order given, which is chain order):

1. The line parses as a canonical ``sealserve-audit/1`` record.
2. ``seq`` is one more than the previous record's (else records were removed,
   inserted or reordered; across files: a file is missing).
3. ``prev`` equals the SHA-256 of the previous record's line (else that record was
   edited). The first record supplied must be the ``open`` record (seq 0, ``prev`` of
   zeros) unless earlier files are knowingly left out (a warning then).
4. Each file after the first starts with a ``rotate`` record naming the previous file.
5. A ``checkpoint`` names a trusted key's fingerprint, covers exactly the records
   since the previous checkpoint, and its Ed25519 signature verifies.
6. Records after the last checkpoint are not covered by any signature: a failure
   naming the first of them, or a warning with ``allow_unsigned_tail``.
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
from sealserve.defense.audit.log import (
    GENESIS,
    public_key_fingerprint,
    sha256_hex,
    signing_payload,
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
            f"signed seq {self.last_signed_seq}, keys {', '.join(self.key_fingerprints) or '-'}"
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
) -> AuditReport:
    """Check the log files ``paths`` (in chain order) and report the first problem.

    ``trusted_public_keys`` are raw 32-byte Ed25519 public keys (see
    ``audit.load_public_key``). Raises ``ConfigError`` if no key or file is given and
    ``AuditError`` if a file cannot be read; problems in the log itself are returned
    in ``AuditReport.problem``.
    """
    trusted = {public_key_fingerprint(bytes(k)): bytes(k) for k in trusted_public_keys}
    if not trusted:
        raise ConfigError("audit verification needs at least one trusted public key")
    if not paths:
        raise ConfigError("audit verification needs at least one log file")
    st = _State()
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
    if not isinstance(rec, dict) or rec.get("v") != 1:
        return bad("not a sealserve-audit/1 record")
    seq, kind, prev = rec.get("seq"), rec.get("kind"), rec.get("prev")
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(kind, str):
        return bad("record lacks an integer seq or a kind")
    if not isinstance(prev, str) or not isinstance(rec.get("time"), int | float):
        return bad("record lacks prev or time", seq)
    try:
        if canonical_json(rec) != body:
            return bad("record is not in canonical form (edited by hand?)", seq)
    except ValueError:
        return bad("record holds values JSON cannot represent", seq)
    # 2-3. position and link
    if st.prev_seq is None:
        st.first_seq = seq
        if kind == "open":
            if seq != 0 or prev != GENESIS:
                return bad("open record must have seq 0 and an all-zero prev", seq)
        else:
            st.warnings.append(
                f"{file}:{line}: chain starts at seq {seq}; earlier records were not supplied"
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
    st.records += 1
    st.prev_seq = seq
    st.prev_hash = sha256_hex(body)
    st.prev_where = (file, line)
    return None


def verify_audit_log(
    paths: Sequence[str | os.PathLike[str]],
    *,
    trusted_public_keys: Iterable[bytes],
    allow_unsigned_tail: bool = False,
) -> AuditReport:
    """Verify the log and return its report; raise ``AuditError`` naming the first bad
    record (file, line, seq, problem) if there is one. See :func:`check_audit_log`."""
    report = check_audit_log(
        paths, trusted_public_keys=trusted_public_keys, allow_unsigned_tail=allow_unsigned_tail
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


def read_records(paths: Sequence[str | os.PathLike[str]]) -> Iterator[dict[str, Any]]:
    """Parse the records of ``paths`` without verifying them (for reports); lines that
    are not JSON objects are skipped."""
    for p in paths:
        for _, raw in _lines(Path(p)):
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec
