"""``sealserve replica-check``: does a suspect behave like a copy of our model?"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sealserve.cli.watermark import add_ledger_args, add_suspect_args, open_ledger, open_suspect


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "replica-check",
        help="compare a suspect with the original on watermark, boundary and natural probes",
        description=(
            "Agreement of the suspect with the original model on three probe sets: the "
            "watermark ledger's inputs, low-confidence inputs near decision boundaries, "
            "and natural inputs; each against the agreement measured between "
            "independently trained models on the demo task (docs/perturbation-watermark.md)."
        ),
    )
    p.add_argument("--original", type=Path, required=True, help="our model (plaintext ONNX)")
    p.add_argument("--natural", type=Path, help="npz with natural inputs 'x' (default: demo)")
    add_ledger_args(p)
    add_suspect_args(p)
    p.set_defaults(func=run)


# Measured once on the demo task: agreement of independently trained models with the
# original (see docs/perturbation-watermark.md, "Replica check baseline").
BASELINE = {"watermark": 0.05, "boundary": 0.42, "natural": 0.97}


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from sealserve.defense.suspect import OnnxSuspect
    from sealserve.defense.watermark_verify import boundary_inputs, replica_check

    original = OnnxSuspect(args.original)
    if args.natural is not None:
        with np.load(args.natural) as data:
            natural = np.asarray(data["x"], dtype=np.float32)
    else:
        from sealserve import demo

        natural = demo.holdout()[0]
    ledger = open_ledger(args)
    wm = np.stack([np.asarray(e.input, dtype=np.float32).reshape(-1) for e in ledger.entries()])
    rng = np.random.default_rng(0)
    candidates = np.clip(
        natural[rng.integers(0, len(natural), 2000)] + rng.normal(0, 3, (2000, natural.shape[1])),
        0, 16,
    ).astype(np.float32)  # fmt: skip
    boundary = boundary_inputs(original, candidates, count=200)
    suspect, close = open_suspect(args)
    try:
        report = replica_check(
            original, suspect, {"watermark": wm, "boundary": boundary, "natural": natural},
            baseline=BASELINE,
        )  # fmt: skip
    finally:
        close()
    print(report.render())
    return 0
