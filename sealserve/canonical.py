"""The one canonical JSON encoding for everything sealserve hashes or signs.

Sorted keys, no whitespace, UTF-8 (not ``\\u`` escapes), and no NaN or infinity: JSON has
none, and a digest over Python's non-standard ``NaN`` token would be one that other
verifiers cannot reproduce. Used by the workload manifest (attested), the audit log
(signed and MAC-chained) and JWK thumbprints (RFC 7638).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["canonical_json"]


def canonical_json(value: Any) -> bytes:
    """Canonical JSON bytes of ``value``.

    Raises:
        ValueError: ``value`` holds a NaN or an infinity.
        TypeError: ``value`` holds something JSON cannot represent.
    """
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()
