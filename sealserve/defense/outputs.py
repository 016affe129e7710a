"""What a model's output tensor means, so that a profile can check it applies."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from sealserve.errors import ConfigError

__all__ = ["OutputKind", "OutputSpec"]


class OutputKind(StrEnum):
    """The kinds of model output a defense profile understands."""

    PROBABILITIES = "probabilities"
    """Shape (batch, classes), each row a probability vector."""
    LOGITS = "logits"
    """Shape (batch, classes), unnormalised scores; argmax is the label."""
    SCORE = "score"
    """Shape (batch,) or (batch, 1): one score per input (e.g. a fraud probability)."""


@dataclass(frozen=True)
class OutputSpec:
    """A model output: its kind, class count and, for scores, the decision threshold.

    Use the named constructors. ``bounds`` is the range a score lives in (``None`` for
    unbounded scores); noise and watermark shifts are clipped to it.
    """

    kind: OutputKind
    num_classes: int
    threshold: float = 0.5
    bounds: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.kind is OutputKind.SCORE:
            if self.num_classes != 1:
                raise ConfigError("a score output has exactly one value per input")
            if not math.isfinite(self.threshold):
                raise ConfigError(f"score threshold must be finite, got {self.threshold!r}")
            if self.bounds is not None:
                lo, hi = self.bounds
                if not (lo < self.threshold < hi):
                    raise ConfigError(
                        f"score threshold {self.threshold} must lie strictly inside "
                        f"the score bounds [{lo}, {hi}]"
                    )
        elif self.num_classes < 2:
            raise ConfigError(
                f"a {self.kind.value} output needs at least 2 classes, got {self.num_classes}"
            )

    @classmethod
    def probabilities(cls, num_classes: int) -> OutputSpec:
        return cls(OutputKind.PROBABILITIES, num_classes)

    @classmethod
    def logits(cls, num_classes: int) -> OutputSpec:
        return cls(OutputKind.LOGITS, num_classes)

    @classmethod
    def score(
        cls, *, threshold: float = 0.5, bounds: tuple[float, float] | None = (0.0, 1.0)
    ) -> OutputSpec:
        return cls(OutputKind.SCORE, 1, threshold=threshold, bounds=bounds)

    @property
    def is_score(self) -> bool:
        return self.kind is OutputKind.SCORE

    def describe(self) -> dict[str, object]:
        d: dict[str, object] = {"kind": self.kind.value, "num_classes": self.num_classes}
        if self.is_score:
            d["threshold"] = self.threshold
            d["bounds"] = list(self.bounds) if self.bounds is not None else None
        return d
