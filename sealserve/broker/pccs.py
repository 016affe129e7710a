"""Intel TDX collateral from a PCCS (or Intel PCS), for quotes that brought none.

The fetch is dcap-qvl's (``dcap_qvl.get_collateral``: PCK CRL, TCB info, QE identity,
root CA CRL and their issuer chains, as a PCCS serves them), under a deadline. What it
returns is untrusted input like any collateral: the verifier checks every signature
against the pinned Intel root. Results are kept in memory per FMSPC for ``ttl``
seconds (collateral changes monthly; a stale set would be refused, not used).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from sealserve.attestation.tdx_collateral import TdxCollateral
from sealserve.errors import UnavailableError

MAX_CACHED_FMSPCS = 64


class PccsClient:
    """Fetch and cache collateral by FMSPC. ``url`` is the PCCS base URL."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        ttl: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[bytes, tuple[float, TdxCollateral]] = {}

    def collateral(self, fmspc: bytes, quote: bytes) -> TdxCollateral:
        """The collateral for ``quote`` (whose PCK certificate has ``fmspc``).

        Raises UnavailableError when the PCCS does not answer in time or answers
        with something unusable, EvidenceFormatError when the answer does not parse.
        """
        now = self._clock()
        with self._lock:
            hit = self._cache.get(fmspc)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        fetched = TdxCollateral.from_dcap_json(self._fetch(quote))
        with self._lock:
            if len(self._cache) >= MAX_CACHED_FMSPCS:
                self._cache.clear()
            self._cache[fmspc] = (now, fetched)
        return fetched

    def _fetch(self, quote: bytes) -> str:
        import dcap_qvl

        async def fetch() -> str:
            got = await asyncio.wait_for(dcap_qvl.get_collateral(self.url, quote), self.timeout)
            return str(got.to_json())

        try:
            # Called from the broker's worker threads, which run no event loop.
            return asyncio.run(fetch())
        except TimeoutError as exc:
            raise UnavailableError(
                f"PCCS {self.url[:80]} did not answer within {self.timeout} s"
            ) from exc
        except (RuntimeError, ValueError) as exc:
            raise UnavailableError(f"PCCS {self.url[:80]}: {str(exc)[:200]}") from exc
