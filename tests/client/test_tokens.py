from __future__ import annotations

from sealserve.auth import TokenIssuer, generate_keypair
from sealserve.client import RefreshingToken


def test_refreshes_before_expiry() -> None:
    pem, _ = generate_keypair("ES256")
    issuer = TokenIssuer.from_pem(pem, issuer="https://i.invalid", audience="a")
    now = [1_800_000_000.0]
    fetched: list[str] = []

    def fetch() -> str:
        tok = issuer.issue_at_time(
            now[0], "acct", tier="t", scopes=["infer"], tos_version="1", ttl=300
        )
        fetched.append(tok)
        return tok

    provider = RefreshingToken(fetch, margin=60, clock=lambda: now[0])
    first = provider()
    assert provider() == first and len(fetched) == 1
    now[0] += 230  # 70 s before exp: still fine
    assert provider() == first and len(fetched) == 1
    now[0] += 20  # 50 s before exp: inside the margin, fetch a new one
    second = provider()
    assert len(fetched) == 2 and second == fetched[1]
