"""Peer identity: the forwarded-for header counts only behind a trusted proxy."""

from __future__ import annotations

import ipaddress

import pytest

from sealserve.defense.peer import parse_transport_peer, peer_address

PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("ipv4:203.0.113.9:55012", "203.0.113.9"),
        ("ipv6:[2001:db8::1]:443", "2001:db8::1"),
        ("203.0.113.9:80", "203.0.113.9"),
        ("2001:db8::2", "2001:db8::2"),
        ("unix:/tmp/sock", None),
        ("garbage", None),
    ],
)
def test_parse_transport_peer(peer: str, expected: str | None) -> None:
    addr = parse_transport_peer(peer)
    assert (None if addr is None else str(addr)) == expected


def test_header_ignored_without_trusted_proxies() -> None:
    assert peer_address("ipv4:203.0.113.9:1", "1.2.3.4", trusted_proxies=()) == "203.0.113.9"


def test_header_ignored_when_peer_is_not_a_trusted_proxy() -> None:
    got = peer_address("ipv4:203.0.113.9:1", "1.2.3.4", trusted_proxies=PROXIES)
    assert got == "203.0.113.9"


def test_header_used_behind_trusted_proxy() -> None:
    got = peer_address("ipv4:10.1.2.3:1", "198.51.100.7", trusted_proxies=PROXIES)
    assert got == "198.51.100.7"


def test_rightmost_untrusted_hop_wins() -> None:
    # The client forged the first entry; the proxies appended the real hops.
    header = "1.1.1.1, 198.51.100.7, 10.9.9.9"
    got = peer_address("ipv4:10.1.2.3:1", header, trusted_proxies=PROXIES)
    assert got == "198.51.100.7"


def test_malformed_hop_stops_at_last_good_one() -> None:
    got = peer_address(
        "ipv4:10.1.2.3:1", "198.51.100.7, not-an-ip, 10.0.0.5", trusted_proxies=PROXIES
    )
    assert got == "10.0.0.5"


def test_all_trusted_chain_uses_leftmost() -> None:
    got = peer_address("ipv6:[fd00::1]:1", "10.0.0.1, fd00::2", trusted_proxies=PROXIES)
    assert got == "10.0.0.1"


def test_empty_header_and_unix_peer() -> None:
    assert peer_address("ipv4:10.1.2.3:1", "", trusted_proxies=PROXIES) == "10.1.2.3"
    assert peer_address("unix:/run/s", "1.2.3.4", trusted_proxies=PROXIES) == "unix:/run/s"
