"""``sealserve admin``: read and change accounts on a running server (admin scope)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from sealserve.cli._connect import add_connection_args, connection_kwargs, token_from


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "admin",
        help="inspect accounts, throttle / challenge / suspend / lift them, reset quotas",
        description=(
            "Talks to a running server's Admin service with a token holding the 'admin' "
            "scope. Status changes persist in the shared state store, so they hold on "
            "every replica."
        ),
    )
    p.add_argument("--target", required=True, metavar="HOST:PORT", help="the server's gRPC port")
    add_connection_args(p)
    actions = p.add_subparsers(dest="admin_action", metavar="ACTION", required=True)

    def account_arg(a: argparse.ArgumentParser) -> None:
        a.add_argument("account", help="the account (the token's subject)")
        a.add_argument("--tier", default="", help="report usage of this tier's limits")

    a = actions.add_parser("account", help="show status, usage and history")
    account_arg(a)
    a.add_argument("--json", action="store_true", help="print JSON")
    t = actions.add_parser("throttle", help="multiply the account's rate by FACTOR")
    account_arg(t)
    t.add_argument("--factor", type=float, required=True, help="in (0, 1), e.g. 0.1")
    c = actions.add_parser("challenge", help="require proof of work with every call")
    account_arg(c)
    c.add_argument("--difficulty", type=int, required=True, help="leading zero bits (1..32)")
    s = actions.add_parser("suspend", help="refuse every call (PERMISSION_DENIED)")
    account_arg(s)
    lift = actions.add_parser("lift", help="back to normal")
    account_arg(lift)
    f = actions.add_parser(
        "forgive", help="clear the account's detector state and lift it (audited)"
    )
    account_arg(f)
    r = actions.add_parser("reset", help="forget the account's current quota usage")
    account_arg(r)
    for q in (t, c, s, lift, f):
        q.add_argument("--reason", default="", help="recorded with the change")
    for q in (t, c, s):
        q.add_argument(
            "--ttl", type=float, default=0.0, help="seconds until it expires (default: 0, never)"
        )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import grpc

    from sealserve._proto import admin_pb2 as adm
    from sealserve._proto import admin_pb2_grpc
    from sealserve.client.client import open_channel
    from sealserve.client.errors import from_rpc_error

    channel, _ = open_channel(args.target, **connection_kwargs(args))
    stub = admin_pb2_grpc.AdminStub(channel)
    token = token_from(args)
    md = (("authorization", f"Bearer {token}"),) if token else ()
    action = args.admin_action
    try:
        if action == "account":
            info = stub.GetAccount(adm.AccountRequest(account=args.account, tier=args.tier),
                                   metadata=md, timeout=10)  # fmt: skip
        elif action == "forgive":
            info = stub.Forgive(
                adm.ForgiveRequest(account=args.account, tier=args.tier, reason=args.reason),
                metadata=md, timeout=10,
            )  # fmt: skip
        elif action == "reset":
            info = stub.ResetQuota(adm.AccountRequest(account=args.account, tier=args.tier),
                                   metadata=md, timeout=10)  # fmt: skip
        else:
            status = {"throttle": "throttled", "challenge": "challenged",
                      "suspend": "suspended", "lift": "normal"}[action]  # fmt: skip
            info = stub.SetStatus(
                adm.SetStatusRequest(
                    account=args.account, status=status, tier=args.tier,
                    factor=getattr(args, "factor", 0.0), difficulty=getattr(args, "difficulty", 0),
                    ttl_seconds=getattr(args, "ttl", 0.0), reason=args.reason,
                ),
                metadata=md, timeout=10,
            )  # fmt: skip
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from exc
    finally:
        channel.close()
    if getattr(args, "json", False):
        print(json.dumps(_to_json(info), indent=2))
    else:
        _print(info)
    return 0


def _to_json(info: Any) -> dict[str, Any]:
    return {
        "account": info.account,
        "status": json.loads(info.status_json),
        "usage": [
            {
                "name": u.name,
                "limit": u.limit,
                "remaining": u.remaining,
                "reset_after": u.reset_after,
            }
            for u in info.usage
        ],
        "history": [json.loads(h) for h in info.history_json],
    }


def _print(info: Any) -> None:
    data = _to_json(info)
    st = data["status"]
    extra = ""
    if st.get("factor") is not None:
        extra += f" factor={st['factor']}"
    if st.get("difficulty") is not None:
        extra += f" difficulty={st['difficulty']}"
    if st.get("expires_at"):
        extra += f" expires in {max(0, st['expires_at'] - time.time()):.0f}s"
    print(f"account {data['account']}: {st['kind']}{extra}")
    if st.get("reason"):
        print(f"  reason: {st['reason']} (by {st.get('set_by', '?')})")
    if data["usage"]:
        print(f"  {'limit':<18} {'remaining':>10} {'of':>8} {'resets in':>10}")
        for u in data["usage"]:
            print(
                f"  {u['name']:<18} {u['remaining']:>10} {u['limit']:>8} {u['reset_after']:>9.0f}s"
            )
    if data["history"]:
        print("  history (newest first):")
        for h in data["history"][:10]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(h.get("set_at") or 0))
            print(f"    {when}Z {h['kind']:<10} {h.get('reason', '')} (by {h.get('set_by', '?')})")
