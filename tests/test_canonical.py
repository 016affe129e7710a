"""One canonical JSON for everything hashed or signed: stable bytes, and no NaN."""

from __future__ import annotations

import math

import pytest

from sealserve.canonical import canonical_json
from sealserve.enclave.manifest import WorkloadManifest


def test_sorted_compact_utf8() -> None:
    assert canonical_json({"b": 1, "a": ["é", 2.5]}) == '{"a":["é",2.5],"b":1}'.encode()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        canonical_json({"x": bad})


def test_the_attested_manifest_refuses_a_nan() -> None:
    # The manifest is what report_data binds: it must never hash a NaN token.
    manifest = WorkloadManifest("1", "0" * 64, {"max_wait_ms": math.nan}, ())
    with pytest.raises(ValueError, match="not JSON compliant"):
        manifest.digest()
    assert WorkloadManifest("1", "0" * 64, {"max_wait_ms": 2.0}, ()).digest()
