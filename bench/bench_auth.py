"""CPU cost of token verification per request (issue 5: at most 40 us, ES256, warm keys).

    PYTHONPATH=. python bench/bench_auth.py [--calls 2000] [--repeats 7]

Prints a markdown table of the median CPU microseconds per ``authenticate()`` call:
warm (verified-token cache hit), cold (cache miss: full ES256 verification with the
key already cached), and plain ``jwt.decode`` for reference. CPU time is this
thread's (``time.thread_time_ns``), so other load on the machine does not count.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jwt

from sealserve.auth import (
    Authenticator,
    AuthSettings,
    IssuerSettings,
    StaticJwksSource,
    TokenIssuer,
    generate_keypair,
)

ISS = "https://issuer.bench"
AUD = "sealserve-bench"
TOS = "2026-01"


def per_call_us(fn: Callable[[int], None], calls: int, repeats: int) -> float:
    samples = []
    for r in range(repeats):
        start = time.thread_time_ns()
        for i in range(calls):
            fn(r * calls + i)
        samples.append((time.thread_time_ns() - start) / calls / 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    pem, jwks = generate_keypair("ES256")
    issuer = TokenIssuer.from_pem(pem, issuer=ISS, audience=AUD)
    settings = AuthSettings(
        issuers=(IssuerSettings(ISS, jwks_url="https://keys.invalid/jwks"),),
        audience=AUD,
        required_tos_version=TOS,
        cache_max_entries=args.calls * args.repeats + 1,
    )
    auth = Authenticator(settings, sources={ISS: StaticJwksSource(jwks)})

    def token(i: int) -> str:
        return issuer.issue(
            f"acct-{i}", tier="free", scopes=["infer"], tos_version=TOS, ttl=3600, jti=f"j{i}"
        )

    warm_header = f"Bearer {token(-1)}"
    auth.authenticate(warm_header, required_scope="infer")
    cold_headers = [f"Bearer {token(i)}" for i in range(args.calls * args.repeats)]
    raw = [h[7:] for h in cold_headers]
    key = jwt.PyJWK(jwks["keys"][0]).key

    warm = per_call_us(lambda i: auth.authenticate(warm_header, required_scope="infer"),
                       args.calls, args.repeats)  # fmt: skip
    cold = per_call_us(lambda i: auth.authenticate(cold_headers[i], required_scope="infer"),
                       args.calls, args.repeats)  # fmt: skip
    plain = per_call_us(
        lambda i: jwt.decode(raw[i], key, algorithms=["ES256"], audience=AUD, issuer=ISS),
        args.calls,
        args.repeats,
    )
    print(f"ES256, {args.calls} calls x {args.repeats} repeats, median CPU per call\n")
    print("| path | CPU us / call |")
    print("|---|---:|")
    print(f"| authenticate(), warm (verified-token cache hit) | {warm:.1f} |")
    print(f"| authenticate(), cold (cache miss, key cached) | {cold:.1f} |")
    print(f"| plain jwt.decode ES256 (reference) | {plain:.1f} |")
    print(f"\nbudget: 40 us per request with a warm key cache -> {'OK' if warm <= 40 else 'OVER'}")


if __name__ == "__main__":
    main()
