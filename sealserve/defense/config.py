"""The ``[defense]`` settings as typed models, validated when the config is loaded.

What each model's answers go through (profiles, watermark, detection, graduated
responses, audit log) is decided here, from the operator's config alone; the objects
are built from it at start by ``sealserve.server.defenses`` (which needs the loaded
models' metadata and the sealed secrets). :func:`describe` is what the workload
manifest says about the defenses: no secrets, no paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sealserve.defense.escalation import (
    DEFAULT_BATCH_ROWS,
    DEFAULT_COHORT_DIFFICULTY,
    DEFAULT_LIFT_GRACE_S,
    DEFAULT_REPEAT_BITS,
    ResponsePolicy,
)
from sealserve.defense.status import DEFAULT_DIFFICULTY, DEFAULT_THROTTLE_FACTOR, MAX_DIFFICULTY
from sealserve.defense.watermark.signal import DEFAULT_MAX_PROBES
from sealserve.errors import ConfigError
from sealserve.validation import describe_validation_error

__all__ = ["AuditConfig", "DefenseConfig", "ModelDefenseConfig", "describe"]


class ModelDefenseConfig(BaseModel):
    """``[defense.models.NAME]``: which tensors the defenses act on, and how."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str | None = Field(default=None, description="Input tensor (default: all).")
    output: str = Field(description="Output tensor the profile rewrites.")
    output_kind: str = Field(default="probabilities", description="probabilities|logits|score")
    label: str | None = Field(default=None, description="Output recomputed as argmax.")
    profile: str = Field(default="default", description="Profile name, or 'none'.")
    tiers: dict[str, str] = Field(default_factory=dict, description="tier -> profile name")
    detection: bool = Field(default=True)
    unsafe_undefended_outputs: list[str] = Field(
        default_factory=list,
        description="Other outputs served as the model computes them, with no defense "
        "(every output not named here, nor output/label, is refused).",
    )
    reference: Path | None = Field(
        default=None, description="npz with 'x': honest inputs for the distribution detector."
    )
    prada: dict[str, Any] = Field(default_factory=dict)
    distribution: dict[str, Any] = Field(default_factory=dict)
    volume: dict[str, Any] = Field(default_factory=dict)


class AuditConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    dir: Path = Path("audit")
    checkpoint_every: int = Field(default=1000, ge=1)
    checkpoint_interval_s: float = Field(default=60.0, gt=0)
    refusals_per_interval: int = Field(
        default=20,
        ge=0,
        le=100_000,
        description="Refused requests recorded one by one per account and interval; "
        "beyond that they are added up into one record per reason.",
    )
    refusal_interval_s: float = Field(default=60.0, gt=0, le=86_400)


class DefenseConfig(BaseModel):
    """``[defense]``; validated at load, built at start (needs the models' metadata)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state_dir: Path | None = Field(default=None, description="Sealed state directory.")
    throttle_factor: float = Field(default=DEFAULT_THROTTLE_FACTOR, gt=0, lt=1)
    challenge_difficulty: int = Field(default=DEFAULT_DIFFICULTY, ge=1, le=MAX_DIFFICULTY)
    lift_grace_s: float = Field(
        default=DEFAULT_LIFT_GRACE_S,
        ge=0,
        description="After an operator lifts or forgives an account, detection does not "
        "escalate it again for this many seconds.",
    )
    cohort_detection: bool = Field(
        default=True,
        description="Also judge young accounts of a tier as one pooled stream and challenge "
        "the young accounts of a flagged cohort: sybils below min_queries are seen. While "
        "a cohort is flagged, honest newcomers pay cohort_challenge_difficulty (~1.6x) "
        "until their own natural rows graduate them; false turns it off.",
    )
    cohort_challenge_difficulty: int = Field(
        default=DEFAULT_COHORT_DIFFICULTY,
        ge=1,
        le=MAX_DIFFICULTY,
        description="Bits of the challenge a young account of a flagged cohort answers "
        "until its own natural rows graduate it (9: ~1.7x an honest account's cost per "
        "row); a young account whose own rows look like noise gets challenge_difficulty.",
    )
    challenge_repeat_bits: int = Field(
        default=DEFAULT_REPEAT_BITS,
        ge=0,
        le=8,
        description="Bits added to a detection challenge for each earlier episode of "
        "detected suspicion (challenge or suspension) of the account.",
    )
    batch_scoring_rows: int = Field(
        default=DEFAULT_BATCH_ROWS,
        ge=1,
        description="A request of at least this many rows is scored before it is "
        "answered (off the event loop); one that trips challenge or suspension is refused.",
    )
    detection_mode: Literal["inline", "beside"] = Field(
        default="inline",
        description="Where the detectors observe a request below batch_scoring_rows: "
        '"inline" before its answer is released; "beside" after it, in groups between '
        "requests (off the event loop with a store that does I/O); the account's next "
        "admission waits for that verdict (docs/detection-audit.md).",
    )
    detection_queue_rows: int = Field(
        default=4096,  # release/beside.py DEFAULT_MAX_PENDING (config sits below it)
        ge=1,
        le=1_000_000,
        description='With detection_mode = "beside": rows queued for detection; the '
        "request that would overflow the queue observes it itself first (a crash can "
        "lose the audit records of the queued rows).",
    )
    detector_state_flush_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="Detectors keep each account's state in process and write what "
        "changed to the state store this often (a crash loses at most this much "
        "detector evidence; statuses are written at once).",
    )
    ledger_save_interval_s: float = Field(
        default=2.0,
        gt=0,
        le=3600,
        description="The sealed watermark ledger is written off the request path, at most "
        "once per this many seconds after a mark (and at shutdown).",
    )
    watermark_probes: int = Field(
        default=DEFAULT_MAX_PROBES,
        ge=0,
        le=100_000,
        description="Boundary probes kept per account and model in the sealed watermark "
        "ledger: the signal watermark's evidence (0 turns the signal test off).",
    )
    response: dict[str, Any] | None = None
    audit: AuditConfig = AuditConfig()
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)
    models: dict[str, ModelDefenseConfig] = Field(default_factory=dict)

    @classmethod
    def parse(cls, data: dict[str, Any]) -> DefenseConfig:
        """The ``[defense]`` table, checked (profiles named by models exist, the
        response policy parses); paths stay as written (see :meth:`relative_to`).

        Raises ConfigError naming the key.
        """
        try:
            cfg = cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(
                "[defense]: invalid settings: " + describe_validation_error(exc)
            ) from exc
        if cfg.response is not None:
            ResponsePolicy.from_mapping(cfg.response)
        for name, m in cfg.models.items():
            for p in (m.profile, *m.tiers.values()):
                if p not in ("none", "default") and p not in cfg.profiles:
                    raise ConfigError(f"[defense.models.{name}] names unknown profile {p!r}")
        return cfg

    def relative_to(self, base: Path) -> DefenseConfig:
        """This config with relative paths (state and audit directories, reference
        samples) taken relative to ``base`` (the config file's directory)."""

        def fix(p: Path | None) -> Path | None:
            return None if p is None or p.is_absolute() else base / p

        models = {
            n: m.model_copy(update={"reference": fix(m.reference) or m.reference})
            for n, m in self.models.items()
        }
        audit = self.audit.model_copy(update={"dir": fix(self.audit.dir) or self.audit.dir})
        return self.model_copy(
            update={"state_dir": fix(self.state_dir) or self.state_dir, "models": models,
                    "audit": audit}
        )  # fmt: skip


def describe(cfg: DefenseConfig) -> dict[str, Any]:
    """The configured defenses for the workload manifest: no secrets, no paths, so
    `sealserve measure` reproduces it from the config alone."""
    return {
        "profiles": cfg.profiles,
        "models": {
            name: {
                "output": m.output, "output_kind": m.output_kind, "label": m.label,
                "profile": m.profile, "tiers": m.tiers, "detection": m.detection,
                "unsafe_undefended_outputs": m.unsafe_undefended_outputs,
                "distribution_reference": m.reference is not None,
                "prada": m.prada, "distribution": m.distribution, "volume": m.volume,
            }
            for name, m in cfg.models.items()
        },
        "response": cfg.response or "default",
        "throttle_factor": cfg.throttle_factor,
        "challenge_difficulty": cfg.challenge_difficulty,
        "challenge_repeat_bits": cfg.challenge_repeat_bits,
        "lift_grace_s": cfg.lift_grace_s,
        "cohort_detection": cfg.cohort_detection,
        "detection_mode": cfg.detection_mode,
        "cohort_challenge_difficulty": cfg.cohort_challenge_difficulty,
        "batch_scoring_rows": cfg.batch_scoring_rows,
        "audit": cfg.audit.enabled,
        "sealed_state": cfg.state_dir is not None,
    }  # fmt: skip
