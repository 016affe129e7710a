"""Replicas an attacker trains on the answers, and the owner's ground truth.

Trainers use the probabilities the API returns (soft labels), not only the top-1
label, so that a defense that only degrades probabilities is not measured as free:
``fit_linear`` fits a multinomial softmax by cross-entropy against the soft targets,
``fit_mlp`` regresses the centred log-probabilities (logit matching, as in
distillation). ``GroundTruth`` runs the unperturbed ONNX model locally: the owner's
evaluation, never the attacker's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

#: Probabilities are clipped here before taking logs (perturbed answers hold zeros).
EPS = 1e-6


class Replica(Protocol):
    """What an attack hands back: a model that labels inputs."""

    def predict_proba(self, x: np.ndarray) -> np.ndarray: ...

    def predict(self, x: np.ndarray) -> np.ndarray: ...


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def centred_logits(probs: np.ndarray) -> np.ndarray:
    """log p minus its row mean: the logits up to the softmax's free constant."""
    logp = np.log(np.clip(probs.astype(np.float64), EPS, 1.0))
    out: np.ndarray = logp - logp.mean(axis=1, keepdims=True)
    return out


@dataclass
class LinearSoftmax:
    """p = softmax(x W + b). Also the Jacobian-augmentation substitute (its gradient
    is analytic) and the form the equation-solving attack recovers."""

    weights: np.ndarray  # (d, k)
    bias: np.ndarray  # (k,)

    def logits(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = x.astype(np.float64) @ self.weights + self.bias
        return out

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return _softmax(self.logits(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.logits(x).argmax(axis=1)
        return out

    def class_gradient(self, x: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """d p_c / d x for each row's class c: p_c (w_c - sum_j p_j w_j)."""
        p = self.predict_proba(x)
        mean_w = p @ self.weights.T  # (n, d)
        w_c = self.weights.T[classes]  # (n, d)
        pc = p[np.arange(len(x)), classes][:, None]
        out: np.ndarray = pc * (w_c - mean_w)
        return out


def fit_linear(
    x: np.ndarray, probs: np.ndarray, *, l2: float = 1e-3, max_iter: int = 100
) -> LinearSoftmax:
    """Multinomial softmax regression on soft targets: minimises the cross-entropy
    H(probs, softmax(xW+b)) + l2/2 |W|^2 (inputs scaled by 1/16), by L-BFGS."""
    from scipy.optimize import minimize

    xs = x.astype(np.float64) / 16.0
    t = probs.astype(np.float64)
    t = t / np.clip(t.sum(axis=1, keepdims=True), EPS, None)
    n, d = xs.shape
    k = t.shape[1]

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: d * k].reshape(d, k), theta[d * k :]
        p = _softmax(xs @ w + b)
        value = -float(np.sum(t * np.log(np.clip(p, 1e-12, None)))) / n
        value += 0.5 * l2 * float(np.sum(w * w))
        g = (p - t) / n
        grad = np.concatenate([(xs.T @ g + l2 * w).ravel(), g.sum(axis=0)])
        return value, grad

    res = minimize(
        loss, np.zeros(d * k + k), jac=True, method="L-BFGS-B", options={"maxiter": max_iter}
    )
    w, b = res.x[: d * k].reshape(d, k), res.x[d * k :]
    return LinearSoftmax(w / 16.0, b)


class SoftMLP:
    """An MLP regressor on centred log-probabilities (logit matching)."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        z = np.asarray(self._model.predict(x.astype(np.float64) / 16.0), np.float64)
        return _softmax(z.reshape(len(x), -1))

    def predict(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.predict_proba(x).argmax(axis=1)
        return out


def fit_mlp(
    x: np.ndarray, probs: np.ndarray, *, hidden: int = 64, seed: int = 0, max_iter: int = 150
) -> SoftMLP:
    """Train an MLP (one hidden layer) to reproduce the victim's logits from soft
    labels. Cost grows with len(x); early stopping keeps 20k rows to seconds."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor

    model = MLPRegressor(
        hidden_layer_sizes=(hidden,),
        alpha=1e-4,
        batch_size=max(1, min(256, int(0.9 * len(x)))),
        learning_rate_init=2e-3,
        max_iter=max_iter,
        early_stopping=len(x) >= 200,
        n_iter_no_change=10,
        random_state=seed,
    )
    with warnings.catch_warnings():
        # Running out of iterations still leaves a usable replica.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x.astype(np.float64) / 16.0, centred_logits(probs))
    return SoftMLP(model)


class GroundTruth:
    """The unperturbed model, run locally with onnxruntime (owner side only)."""

    def __init__(self, onnx_path: Path, *, input_name: str = "input") -> None:
        import onnxruntime as ort

        self._session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self._input = input_name
        names = [o.name for o in self._session.get_outputs()]
        self._probs = "probabilities" if "probabilities" in names else names[-1]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        out = self._session.run([self._probs], {self._input: x.astype(np.float32)})[0]
        return np.asarray(out, np.float64)

    def predict(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.predict_proba(x).argmax(axis=1)
        return out

    @classmethod
    def demo(cls) -> GroundTruth:
        """The bundled digits model."""
        from sealserve import demo

        return cls(demo.repository() / "digits" / "1" / "model.onnx")
