"""The owner's watermark check for bench/bench_theft.py (``--watermark
bench.theft_watermark:check``): unseal the defended server's ledger with its
(simulated) platform and test a replica against it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from sealserve.defense.audit.state import unwrap_versioned
from sealserve.defense.watermark.ledger import WatermarkLedger
from sealserve.defense.watermark.verify import verify
from sealserve.enclave.manifest import code_digest
from sealserve.enclave.sealed_state import SealedBox
from sealserve.enclave.simulated import SimulatedPlatform
from sealserve.errors import SealserveError
from sealserve.server.manifest import simulated_measurement

LABEL = b"sealserve/watermark-ledger/v1"


def check(config: Path) -> Callable[[Callable[[np.ndarray], np.ndarray]], float | None] | None:
    base = config.parent
    if not (base / "platform").is_dir():
        return None  # the undefended deployment: no watermark, no ledger
    platform = SimulatedPlatform(
        base / "platform", measurement=simulated_measurement(code_digest())
    )
    box = SealedBox(platform.sealing_key(LABEL))

    def pvalue(predict: Callable[[np.ndarray], np.ndarray]) -> float | None:
        path = base / "state" / "watermark-ledger"
        if not path.exists():
            return None
        # The sealed payload carries the ledger's version (bound into the audit log) first.
        ledger = WatermarkLedger.from_sealed(
            path.read_bytes(), unseal=lambda b: unwrap_versioned(box.unseal(b, label=LABEL))[1]
        )
        if not ledger.entries() and not ledger.probes() and not ledger.band_rows():
            return None  # nothing recorded: no test to run
        try:
            return verify(ledger, predict, num_classes=10).p_value
        except SealserveError:
            return None

    return pvalue
