"""``sealserve audit``: verify the signed audit log; report per-account query volume.

    sealserve audit verify LOG... --public-key KEY [--expect-head HEAD]
                          [--allow-unsigned-tail] [--allow-missing-start]
                          [--sealed-state DIR]
    sealserve audit head --target HOST:PORT [-o HEAD.json]   (audit scope)
    sealserve audit report LOG... [--html OUT.html] [--png OUT.png] [--top N]

LOG is a log file or a directory holding ``audit-NNNNNN.jsonl`` files (taken in
order) and/or ``worker-K/`` directories of them (a server with ``workers = N``: one chain
per worker, each verified on its own; ``report`` reads them as one log).
KEY is a file (PEM, raw 32 bytes or hex) or 64 hex characters. HEAD is a
file written by ``audit head`` (or a head's JSON) or ``SEQ:HASH``.

Over 400 lines: one subcommand's three actions (verify over every chain, head, report
with its HTML page and plots).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import time
from pathlib import Path
from typing import Any

from sealserve.errors import ConfigError

EXIT_OK = 0
EXIT_FAILED = 1


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "audit", help="verify the signed audit log or report on accounts' query volume"
    )
    sub = parser.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    verify = sub.add_parser("verify", help="check the hash chain and checkpoint signatures")
    verify.add_argument("logs", nargs="+", metavar="LOG", help="log files or directories")
    verify.add_argument(
        "--public-key",
        action="append",
        required=True,
        metavar="KEY",
        help="trusted audit public key: file (PEM/raw/hex) or 64 hex chars; repeatable",
    )
    verify.add_argument(
        "--expect-head",
        metavar="HEAD",
        help="a head you saw earlier (file from `audit head`, its JSON, or SEQ:HASH): "
        "fail unless the log holds exactly that record (detects a log cut short)",
    )
    verify.add_argument(
        "--allow-unsigned-tail",
        action="store_true",
        help="warn, instead of failing, about records after the last checkpoint "
        "(a live server's log always has some)",
    )
    verify.add_argument(
        "--allow-missing-start",
        action="store_true",
        help="warn, instead of failing, when the log does not start with its open record "
        "(earlier files left out on purpose)",
    )
    verify.add_argument(
        "--sealed-state",
        type=Path,
        metavar="DIR",
        help="the server's defense.state_dir: its sealed files must be the versions the "
        "log recorded last (detects a rolled-back watermark ledger)",
    )
    verify.set_defaults(func=_verify)
    head = sub.add_parser(
        "head",
        help="fetch a running server's signed audit-log head (keep it for --expect-head)",
    )
    head.add_argument("--target", required=True, metavar="HOST:PORT", help="the server's gRPC port")
    head.add_argument("-o", "--output", type=Path, metavar="HEAD.json", help="write it here")
    from sealserve.cli._connect import add_connection_args

    add_connection_args(head)
    head.set_defaults(func=_head)
    report = sub.add_parser("report", help="accounts ranked by volume and detector score")
    report.add_argument("logs", nargs="+", metavar="LOG", help="log files or directories")
    report.add_argument("--html", type=Path, metavar="OUT.html", help="write an HTML report")
    report.add_argument("--png", type=Path, metavar="OUT.png", help="write the plots as PNG")
    report.add_argument("--top", type=int, default=20, help="accounts to show (default 20)")
    report.set_defaults(func=_report)


def _expand(logs: list[str]) -> list[list[Path]]:
    """The chains to verify: the files named on the command line form one chain; a
    directory gives each of its chains (its own files, then each ``worker-K/``)."""
    from sealserve.defense.audit.chains import chains
    from sealserve.errors import ConfigError

    named: list[Path] = []
    out: list[list[Path]] = []
    for item in logs:
        p = Path(item)
        if p.is_dir():
            found = chains(p)
            if not found:
                raise ConfigError(f"{p} holds no audit-NNNNNN.jsonl files (nor worker-K/ logs)")
            out.extend(found)
        elif p.exists():
            named.append(p)
        else:
            raise ConfigError(f"audit log {p} does not exist")
    return ([named] if named else []) + out


def _key(spec: str) -> bytes:
    from sealserve.defense.audit.log import load_public_key
    from sealserve.errors import ConfigError

    p = Path(spec)
    if _is_file(p):
        return load_public_key(p.read_bytes())
    if len(spec) == 64:
        return load_public_key(spec)
    shown = spec[:32] + ("..." if len(spec) > 32 else "")
    raise ConfigError(
        f"--public-key {shown!r} ({len(spec)} chars) is neither a readable file nor 64 hex "
        "characters"
    )


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except OSError:  # e.g. a long literal that is no file name
        return False


def _expected_head(spec: str | None) -> Any:
    from sealserve.defense.audit.head import MAX_HEAD_BYTES, AuditHead

    if spec is None:
        return None
    p = Path(spec)
    if _is_file(p):
        if p.stat().st_size > MAX_HEAD_BYTES:
            raise ConfigError(f"--expect-head {p}: larger than a head ({MAX_HEAD_BYTES} bytes)")
        return AuditHead.parse(p.read_text(encoding="utf-8", errors="replace"))
    return AuditHead.parse(spec)


def _verify(args: argparse.Namespace) -> int:
    from sealserve.defense.audit.state import check_sealed_files
    from sealserve.defense.audit.verify import check_audit_log, read_records
    from sealserve.errors import AuditError

    chains = _expand(args.logs)
    keys = [_key(k) for k in args.public_key]
    expect = _expected_head(args.expect_head)
    reports = []
    for files in chains:
        try:
            reports.append(check_audit_log(
                files, trusted_public_keys=keys, allow_unsigned_tail=args.allow_unsigned_tail,
                allow_missing_start=args.allow_missing_start,
                # Several chains: the head is one worker's; looked for in each below.
                expect_head=expect if len(chains) == 1 else None,
            ))  # fmt: skip
        except AuditError as exc:
            if expect is None:
                raise
            print(f"--expect-head refused: {exc.message}")
            return EXIT_FAILED
    failed = False
    for report in reports:
        for warning in report.warnings:
            print(f"warning: {warning}")
    if args.sealed_state is not None:
        records = read_records([f for files in chains for f in files])
        for fatal, message in check_sealed_files(records, args.sealed_state):
            print(f"{'sealed state' if fatal else 'warning'}: {message}")
            failed = failed or fatal
    for files, report in zip(chains, reports, strict=True):
        if len(chains) > 1:
            print(f"chain {files[0].parent}:")
        failed = _print_report(report) or failed
    if expect is not None and not failed:
        if len(chains) == 1 or any(_holds(files, keys, expect, args) for files in chains):
            print(f"expected head {expect.seq} found: the log was not cut short below it")
        else:
            print(f"--expect-head refused: no chain holds head {expect.seq}:{expect.hash}")
            failed = True
    if len(chains) > 1:
        print(f"{len(chains)} chains (one per worker): {'FAILED' if failed else 'OK'}")
    return EXIT_FAILED if failed else EXIT_OK


def _holds(files: list[Path], keys: list[bytes], expect: Any, args: argparse.Namespace) -> bool:
    """Whether this chain holds exactly the expected head (with several chains, the
    head of the one worker that answered `audit head`)."""
    from sealserve.defense.audit.verify import check_audit_log
    from sealserve.errors import AuditError

    try:
        report = check_audit_log(
            files, trusted_public_keys=keys, allow_unsigned_tail=args.allow_unsigned_tail,
            allow_missing_start=args.allow_missing_start, expect_head=expect,
        )  # fmt: skip
    except AuditError:
        return False
    return report.ok


def _print_report(report: Any) -> bool:
    """Print one chain's verification; True when it failed."""
    print(report.summary())
    if report.problem is None:
        return False
    print(f"first bad record: {report.problem}")
    if "not covered by any signature" in report.problem.problem:
        print(
            "hint: a running server's log always ends in records not signed yet; "
            "pass --allow-unsigned-tail to accept them (and --expect-head with a head "
            "from `sealserve audit head` to pin them)"
        )
    return True


def _head(args: argparse.Namespace) -> int:
    import os
    import sys

    import grpc

    from sealserve._proto import audit_pb2, audit_pb2_grpc
    from sealserve.cli._connect import connection_kwargs, token_from
    from sealserve.client.client import open_channel
    from sealserve.client.errors import from_rpc_error
    from sealserve.defense.audit.head import AuditHead, head_public_key
    from sealserve.errors import AuditError

    nonce = os.urandom(32)
    channel, endpoint = open_channel(args.target, **connection_kwargs(args))
    token = token_from(args)
    md = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        reply = audit_pb2_grpc.AuditStub(channel).GetHead(
            audit_pb2.GetHeadRequest(nonce=nonce), metadata=md, timeout=10
        )
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from exc
    finally:
        channel.close()
    head = AuditHead.from_json(reply.head)
    # Fresh (answers our nonce) and signed by the key it names; on an attested channel
    # that key must be the one the evidence's runtime keys record holds.
    head.verify({head.key: head_public_key(head)}, nonce=nonce.hex())
    if endpoint is not None:
        attested = endpoint.runtime_keys
        if attested.audit_public_key != head_public_key(head):
            raise AuditError(
                f"the head is signed by {head.key}, not by the attested audit key "
                f"({attested.audit_fingerprint or 'the evidence names none'})"
            )
        print(f"head signed by the attested audit key {head.key}", file=sys.stderr)
    data = head.to_json().decode()
    if args.output is not None:
        args.output.write_text(data + "\n", encoding="utf-8")
        print(f"wrote {args.output}: seq {head.seq}, hash {head.hash}, key {head.key}")
    else:
        print(data)
    return EXIT_OK


def _table(summaries: list[Any], top: int) -> str:
    head = (
        f"{'account':<24} {'answered':>8} {'throttld':>8} {'refused':>7} {'peak/h':>7} "
        f"{'max score':>9} {'by':<13} {'coverage':>8} {'status':<10}"
    )
    rows = [head, "-" * len(head)]
    for a in summaries[:top]:
        cov = "-" if a.coverage_ratio is None else f"{a.coverage_ratio:.2f}x"
        rows.append(
            f"{a.account[:24]:<24} {a.queries:>8} {a.throttled:>8} {a.refused:>7} "
            f"{a.peak_per_hour:>7} {a.max_score:>9.2f} {a.top_detector:<13} {cov:>8} "
            f"{a.status:<10}"
        )
    rows.append(
        "answered: queries answered (throttld: of those, answered while throttled or "
        "challenged); refused: refused before inference (rate limit, suspended, challenge)"
    )
    return "\n".join(rows)


def count_axis(ax: Any, counts: list[int]) -> None:
    """An x axis of counts: never below 0, and logarithmic (symlog, so 0 still shows)
    when the counts span two decades or more."""
    top = max(counts, default=0)
    low = min((c for c in counts if c > 0), default=1)
    if top >= 100 * low:
        ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(left=0, right=max(1.0, top * (2.0 if top >= 100 * low else 1.05)))


def _legend_below(ax: Any) -> None:
    """The legend under the axes, where it hides no point."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=8, frameon=False)


def report_figure(summaries: list[Any], top: int) -> Any:
    """The report's figure (matplotlib ``Figure``): volume per account, highest score
    against volume, input coverage against honest traffic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = summaries[:top]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    names = [a.account for a in shown]
    colors = ["tab:red" if a.max_score >= 0.5 else "tab:blue" for a in shown]
    axes[0].barh(names[::-1], [a.queries for a in shown][::-1], color=colors[::-1])
    count_axis(axes[0], [a.queries for a in shown])
    axes[0].set_title("Queries per account (red: flagged)")
    axes[0].set_xlabel("queries")
    axes[1].scatter(
        [a.queries for a in summaries], [a.max_score for a in summaries], c="tab:purple", s=14
    )
    axes[1].axhline(0.5, color="tab:red", linestyle="--", label="flag point")
    count_axis(axes[1], [a.queries for a in summaries])
    axes[1].set_title("Highest detector score vs volume")
    axes[1].set_xlabel("queries")
    axes[1].set_ylabel("score")
    _legend_below(axes[1])
    cov = [a for a in summaries if a.coverage_ratio is not None]
    if cov:
        axes[2].scatter(
            [a.coverage_ratio for a in cov],
            [a.outlier_rate or 0.0 for a in cov],
            c=["tab:red" if a.max_score >= 0.5 else "tab:green" for a in cov],
            s=14,
        )
        axes[2].axvline(1.0, color="grey", linestyle=":", label="honest reference")
        _legend_below(axes[2])
    axes[2].set_title("Input coverage vs honest traffic")
    axes[2].set_xlabel("coverage ratio (1 = like honest traffic)")
    axes[2].set_ylabel("outlier rate")
    fig.tight_layout()
    return fig


def _figure(summaries: list[Any], top: int) -> bytes:
    import matplotlib.pyplot as plt

    fig = report_figure(summaries, top)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _html(summaries: list[Any], top: int, png: bytes, files: list[Path]) -> str:
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(v))}</td>"
            for v in (
                a.account,
                a.queries,
                a.throttled,
                a.refused,
                ", ".join(f"{k} {n}" for k, n in sorted(a.refused_by.items())) or "-",
                a.peak_per_hour,
                f"{a.max_score:.2f}",
                a.top_detector,
                "-" if a.coverage_ratio is None else f"{a.coverage_ratio:.2f}x",
                a.status,
                a.last_reason[:200],
            )
        )
        + "</tr>"
        for a in summaries[:top]
    )
    by_score = sorted(summaries, key=lambda a: -a.max_score)[:top]
    flagged = "".join(
        f"<li><b>{html.escape(a.account)}</b>: {a.max_score:.2f} "
        f"({html.escape(a.top_detector)}), status {html.escape(a.status)}</li>"
        for a in by_score
        if a.max_score >= 0.5
    )
    img = base64.b64encode(png).decode()
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>sealserve audit report"
        "</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:"
        "collapse}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}</style>"
        "</head><body><h1>sealserve audit report</h1>"
        f"<p>{len(summaries)} accounts from {len(files)} file(s); generated {generated}. "
        "This report reads the log without verifying it; run "
        "<code>sealserve audit verify</code> for that.</p>"
        f"<h2>Flagged accounts</h2><ul>{flagged or '<li>none</li>'}</ul>"
        f"<h2>Plots</h2><img alt='plots' src='data:image/png;base64,{img}'>"
        "<h2>Accounts by volume</h2><table><tr><th>account</th><th>answered</th>"
        "<th>answered throttled</th><th>refused</th><th>refused by</th><th>peak/h</th>"
        "<th>max score</th><th>by</th><th>coverage</th>"
        f"<th>status</th><th>last reason</th></tr>{rows}</table></body></html>"
    )


def _report(args: argparse.Namespace) -> int:
    from sealserve.defense.audit.report import summarize_accounts
    from sealserve.defense.audit.verify import read_records
    from sealserve.errors import ConfigError

    if args.top < 1:
        raise ConfigError("--top must be at least 1")
    files = [f for chain in _expand(args.logs) for f in chain]
    summaries = summarize_accounts(read_records(files))
    print(f"Accounts by volume ({len(summaries)} total):")
    print(_table(summaries, args.top))
    by_score = sorted(summaries, key=lambda a: (-a.max_score, -a.queries))
    print("\nAccounts by detector score:")
    print(_table(by_score, args.top))
    if args.html or args.png:
        png = _figure(summaries, args.top)
        if args.png:
            args.png.write_bytes(png)
            print(f"wrote {args.png}")
        if args.html:
            args.html.write_text(_html(summaries, args.top, png, files), encoding="utf-8")
            print(f"wrote {args.html}")
    return EXIT_OK
