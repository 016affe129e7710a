"""Fixtures for the defense tests: one BLAS/OpenMP thread (the machine is shared and
oversubscribed threads make scikit-learn 100x slower)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    with threadpool_limits(limits=1):
        yield
