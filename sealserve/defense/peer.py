"""Which address a request comes from, for per-peer limits.

The transport peer is the truth unless it is a proxy the configuration trusts; only then
is the forwarded-for header read, right to left, skipping further trusted proxies. A
forwarded-for header from anyone else is ignored: a client cannot choose its own peer.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from sealserve.defense.limits import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_transport_peer(peer: str) -> IPAddress | None:
    """The IP of a gRPC-style peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``), a
    plain ``host:port`` or bare address; None for unix sockets and anything else."""
    text = peer.strip()
    for scheme in ("ipv4:", "ipv6:"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
            break
    else:
        if text.startswith("unix:"):
            return None
    if text.startswith("["):
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _trusted(addr: IPAddress, proxies: Sequence[IPNetwork]) -> bool:
    return any(addr.version == net.version and addr in net for net in proxies)


def peer_address(
    transport_peer: str, forwarded_for: str | None, *, trusted_proxies: Sequence[IPNetwork]
) -> str:
    """The address per-peer limits count for this request.

    Uses ``forwarded_for`` (``X-Forwarded-For`` style, comma-separated, client first) only
    when ``transport_peer`` is in ``trusted_proxies``; then the rightmost entry that is
    not itself a trusted proxy wins (a malformed entry stops the walk at the last good
    hop). Unparseable transport peers are returned as given (e.g. ``unix:``).
    """
    addr = parse_transport_peer(transport_peer)
    if addr is None:
        return transport_peer
    if not forwarded_for or not _trusted(addr, trusted_proxies):
        return str(addr)
    current = addr
    for item in reversed(forwarded_for.split(",")):
        hop = parse_transport_peer(item)
        if hop is None:
            break
        current = hop
        if not _trusted(hop, trusted_proxies):
            break
    return str(current)
