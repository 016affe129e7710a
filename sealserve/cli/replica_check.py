"""``sealserve replica-check``: does a suspect behave like a copy of our model?"""

from __future__ import annotations

import argparse
import dataclasses
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
            "and natural inputs; each against the agreement of independently trained "
            "--reference models with the original on the same inputs. Without references "
            "the figures measured on the demo task are shown for orientation and no "
            "verdict is drawn (docs/perturbation-watermark.md)."
        ),
    )
    p.add_argument("--original", type=Path, required=True, help="our model (plaintext ONNX)")
    p.add_argument("--natural", type=Path, help="npz with natural inputs 'x' (default: demo)")
    p.add_argument(
        "--reference", type=Path, action="append", default=[], metavar="MODEL.onnx",
        help="an independently trained model (repeatable): measure the baseline with these "
        "instead of using the one measured on the demo task",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable report")
    add_ledger_args(p)
    add_suspect_args(p)
    p.set_defaults(func=run)


# Measured once on the demo task: the highest agreement of five independently trained
# models with the original (docs/perturbation-watermark.md, "Replica check baseline";
# tests/defense/test_defense_digits.py prints it). Only meaningful for the demo model:
# for another model pass --reference models.
BASELINE = {"watermark": 0.65, "boundary": 0.42, "natural": 0.971}


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from sealserve.defense.watermark.replica import boundary_inputs, replica_check
    from sealserve.defense.watermark.suspect import OnnxSuspect

    original = OnnxSuspect(args.original)
    if args.natural is not None:
        with np.load(args.natural) as data:
            natural = np.asarray(data["x"], dtype=np.float32)
    else:
        from sealserve import demo

        natural = demo.holdout()[0]
    ledger = open_ledger(args)
    entries = ledger.entries()
    probes: dict[str, np.ndarray] = {}
    if entries:
        probes["watermark"] = np.stack(
            [np.asarray(e.input, dtype=np.float32).reshape(-1) for e in entries]
        )
    else:
        print("note: the ledger holds no watermark marks; the watermark probe set is skipped")
    # Boundary candidates: natural inputs plus noise of half each feature's spread,
    # kept inside the range the natural inputs span.
    rng = np.random.default_rng(0)
    flat = natural.reshape(len(natural), -1)
    noise = rng.normal(0.0, 1.0, (2000, flat.shape[1])) * (0.5 * flat.std(axis=0) + 1e-6)
    candidates = np.clip(flat[rng.integers(0, len(flat), 2000)] + noise,
                         flat.min(axis=0), flat.max(axis=0)).astype(np.float32)  # fmt: skip
    probes["boundary"] = boundary_inputs(original, candidates, count=200)
    probes["natural"] = natural
    references = [OnnxSuspect(r) for r in args.reference]
    suspect, close = open_suspect(args)
    try:
        report = replica_check(original, suspect, probes, references=references,
                               baseline=None if references else BASELINE)  # fmt: skip
    finally:
        close()
    if not references:
        # A fixed baseline cannot judge a suspect trained on other data or probed with
        # other inputs (a strong innocent model beats weak references): no verdict.
        report = dataclasses.replace(report, replica_likely=False, basis="orientation")
    print(report.to_json() if args.json else report.render())
    return 0
