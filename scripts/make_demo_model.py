#!/usr/bin/env python3
"""Train the demo model reproducibly and export it to ONNX.

A small MLP classifier on scikit-learn's bundled digits data set (8x8 images, 64
features in 0..16, 10 classes). Writes:

- sealserve/demo/models/digits/1/model.onnx   (input 'input' FP32 [-1, 64];
  outputs 'label' INT64 [-1] and 'probabilities' FP32 [-1, 10])
- sealserve/demo/digits_holdout.npz           (held-out inputs and labels for the demo)
- sealserve/demo/reference.npz                (500 training inputs: the detectors' reference)

Needs the [dev] extra (scikit-learn, skl2onnx). Serving needs neither.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "sealserve" / "demo"
SEED = 20261128


def main() -> int:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=SEED, stratify=y
    )
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=SEED)
    clf.fit(x_train, y_train)
    acc = clf.score(x_test, y_test)
    onx = to_onnx(
        clf,
        x_train[:1],
        options={id(clf): {"zipmap": False}},
        target_opset=17,
    )
    # Name the input for what it is; skl2onnx calls it 'X'.
    graph = onx.graph
    old = graph.input[0].name
    graph.input[0].name = "input"
    for node in graph.node:
        node.input[:] = ["input" if n == old else n for n in node.input]
    out = DEMO / "models" / "digits" / "1" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    onx.producer_version = ""
    out.write_bytes(onx.SerializeToString())
    np.savez_compressed(DEMO / "digits_holdout.npz", x=x_test, y=y_test.astype(np.int64))
    # A sample of natural inputs for the distribution detector's reference (drawn from
    # the training split, so it never overlaps the held-out data honest traffic uses).
    pick = np.random.default_rng(SEED).choice(len(x_train), size=500, replace=False)
    np.savez_compressed(DEMO / "reference.npz", x=x_train[np.sort(pick)])
    print(f"wrote {out} ({out.stat().st_size} bytes); held-out accuracy {acc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
