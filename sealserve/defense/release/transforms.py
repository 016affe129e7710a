"""Output transforms: each a small validated value object that the hot path
(:mod:`sealserve.defense.release.hot_path`) applies in its fixed order.

Rounding, top-k, keyed deterministic noise (a table of inverse-CDF quantiles indexed by
a keyed BLAKE2b digest) and Lee et al.'s reverse sigmoid; see
:mod:`sealserve.defense.release.profile` for the order and the references.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.special import ndtri

from sealserve.errors import ConfigError

_LEVELS = 1 << 16


def derive_key(root: bytes, purpose: str) -> bytes:
    """A per-purpose subkey: ``HMAC-SHA256(root, "sealserve/defense/<purpose>/v1")``."""
    return hmac.digest(root, f"sealserve/defense/{purpose}/v1".encode(), "sha256")


@dataclass(frozen=True)
class Round:
    """Round every value to ``decimals`` decimals (0..10)."""

    decimals: int

    def __post_init__(self) -> None:
        if isinstance(self.decimals, bool) or not isinstance(self.decimals, int):
            raise ConfigError(f"round.decimals must be an integer, got {self.decimals!r}")
        if not 0 <= self.decimals <= 10:
            raise ConfigError(f"round.decimals must be in 0..10, got {self.decimals}")

    @property
    def unit(self) -> float:
        return float(10.0**-self.decimals)


@dataclass(frozen=True)
class TopK:
    """Keep the ``k`` largest values; ``mode`` "zero" zeroes the others, "omit" drops them."""

    k: int
    mode: Literal["zero", "omit"] = "zero"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"top_k.k must be an integer >= 1, got {self.k!r}")
        if self.mode not in ("zero", "omit"):
            raise ConfigError(f"top_k.mode must be 'zero' or 'omit', got {self.mode!r}")


@dataclass(frozen=True)
class KeyedNoise:
    """Deterministic keyed noise: ``dist`` "gaussian" (sd = scale) or "laplace" (b = scale)."""

    dist: Literal["gaussian", "laplace"]
    scale: float

    def __post_init__(self) -> None:
        if self.dist not in ("gaussian", "laplace"):
            raise ConfigError(f"noise.dist must be 'gaussian' or 'laplace', got {self.dist!r}")
        if (
            isinstance(self.scale, bool)
            or not isinstance(self.scale, int | float)
            or not math.isfinite(self.scale)
            or self.scale <= 0
        ):
            raise ConfigError(f"noise.scale must be a finite number > 0, got {self.scale!r}")

    def table(self) -> np.ndarray:
        """The noise quantiles ``scale * F^-1((k + 1/2) / 2^16)``, k = 0 .. 2^16 - 1.

        Sampling looks a 16-bit keyed integer up in this table: the noise takes one of
        65,536 equiprobable values (tails cut at about 4.3 sd for Gaussian, 11.1 b for
        Laplace), which is plenty for a defense and costs two numpy calls per request.
        """
        u = (np.arange(_LEVELS, dtype=np.float64) + 0.5) / _LEVELS
        if self.dist == "gaussian":
            z: np.ndarray = ndtri(u)
        else:
            c = u - 0.5
            z = -np.sign(c) * np.log1p(-2.0 * np.abs(c))
        return z * self.scale

    def sample(self, digests: list[bytes], width: int, table: np.ndarray) -> np.ndarray:
        """Noise of shape (len(digests), width) from per-row secret digests.

        Each digest gives one 16-bit index per value (its own bytes when it is long
        enough, else its SHAKE-256 expansion), looked up in :meth:`table` (computed
        once per bound profile).
        """
        need = 2 * width
        if digests and len(digests[0]) >= need:
            raw = b"".join([d[:need] for d in digests])
        else:
            raw = b"".join([hashlib.shake_256(d).digest(need) for d in digests])
        z: np.ndarray = table[np.frombuffer(raw, dtype="<u2")]
        return z.reshape(len(digests), width)

    @staticmethod
    def digest_size(width: int) -> int:
        """Bytes of keyed digest per row: 2 per value, between 16 and 64."""
        return max(16, min(64, 2 * width))


@dataclass(frozen=True)
class ReverseSigmoid:
    """Lee et al. (2019) reverse-sigmoid perturbation with magnitude ``beta`` and
    convergence ``gamma``: ``y_hat = alpha (y - beta (sigmoid(gamma logit y) - 1/2))``."""

    beta: float
    gamma: float

    def __post_init__(self) -> None:
        for name in ("beta", "gamma"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ConfigError(f"reverse_sigmoid.{name} must be a number, got {v!r}")
            if v <= 0:
                raise ConfigError(f"reverse_sigmoid.{name} must be > 0, got {v!r}")

    def __call__(self, y: np.ndarray) -> np.ndarray:
        p = np.clip(y, 1e-12, 1.0 - 1e-12)
        logit = np.log(p) - np.log1p(-p)
        r = self.beta * (1.0 / (1.0 + np.exp(-self.gamma * logit)) - 0.5)
        out = np.clip(y - r, 0.0, 1.0)
        total = out.sum(axis=-1, keepdims=True)
        res: np.ndarray = np.divide(
            out, total, out=np.full_like(out, 1.0 / out.shape[-1]), where=total > 0
        )
        return res
