"""Token providers for the SDK: a fixed token, or one fetched again before it expires."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import jwt


class RefreshingToken:
    """Calls ``fetch()`` for a new token when the current one is within ``margin``
    seconds of its ``exp``. Pass an instance as ``token=`` to Client/AsyncClient.

    The client does not verify its own token (the server does); it only reads ``exp``.
    """

    def __init__(
        self,
        fetch: Callable[[], str],
        *,
        margin: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._fetch = fetch
        self._margin = margin
        self._clock = clock
        self._token = ""
        self._exp = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            if not self._token or self._clock() >= self._exp - self._margin:
                token = self._fetch()
                claims = jwt.decode(token, options={"verify_signature": False})
                exp = claims.get("exp")
                self._exp = float(exp) if isinstance(exp, int | float) else self._clock() + 60
                self._token = token
            return self._token
