"""Build the output defenses from ``[defense]`` (composition root helper).

Secrets come from sealed state in ``defense.state_dir``: the defense root key (noise
and watermark), the audit signing key and the watermark ledger are sealed with a key
derived from the attestation platform and bound to the measurement. Without a
platform they are generated in memory for this process only (logged loudly).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sealserve.defense.audit.log import AuditKey, AuditLog
from sealserve.defense.audit.refusals import RefusalCounter
from sealserve.defense.audit.state import (
    LEDGER,
    check_sealed_version,
    file_sha256,
    ledger_file,
    reapply_statuses,
    unwrap_versioned,
    wrap_versioned,
)
from sealserve.defense.config import DefenseConfig, ModelDefenseConfig
from sealserve.defense.detect import (
    DetectorSuite,
    DistributionConfig,
    DistributionDetector,
    PradaConfig,
    PradaDetector,
    VolumeConfig,
    VolumeDetector,
)
from sealserve.defense.detect.cache import StateCache
from sealserve.defense.detect.state import BlobStore, MemoryBlobStore
from sealserve.defense.escalation import ResponsePolicy
from sealserve.defense.outputs import OutputSpec
from sealserve.defense.quota import QuotaGuard
from sealserve.defense.release.pipeline import ModelDefense, OutputDefenses, Responses
from sealserve.defense.release.profile import Profile
from sealserve.defense.release.transforms import derive_key
from sealserve.defense.watermark.ledger import WatermarkLedger
from sealserve.defense.watermark.signal import DEFAULT_MAX_PROBES
from sealserve.enclave.platform import Platform
from sealserve.enclave.sealed_state import SealedBox, SealedFile
from sealserve.errors import ConfigError
from sealserve.server.engine import Engine

log = logging.getLogger("sealserve.defense")


@dataclass
class SealedState:
    """Secrets kept at rest under the platform's sealing key (or in memory only)."""

    platform: Platform | None
    directory: Path | None
    #: The ledger's file in ``directory`` (workers: one each, ``ledger_file(K)``).
    ledger_name: str = LEDGER
    ephemeral: bool = field(init=False)

    def __post_init__(self) -> None:
        self.ephemeral = self.platform is None or self.directory is None
        if self.ephemeral:
            log.warning(
                "defense secrets are EPHEMERAL (no attestation platform or no "
                "defense.state_dir): noise keys, watermark ledger and audit key live only "
                "in this process"
            )
        elif self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _file(self, name: str, *, path_name: str | None = None) -> SealedFile | None:
        if self.ephemeral or self.platform is None or self.directory is None:
            return None
        label = f"sealserve/{name}/v1".encode()
        path = self.directory / (path_name or name)
        return SealedFile(path, SealedBox(self.platform.sealing_key(label)), label=label)

    def secret(self, name: str, make: Any) -> bytes:
        """The sealed secret ``name``, created with ``make()`` on first use."""
        f = self._file(name)
        if f is None:
            return bytes(make())
        if f.exists():
            return f.read()
        value = bytes(make())
        f.write(value)
        return value

    def save_ledger(self, ledger: WatermarkLedger, version: int) -> Path | None:
        """Seal ``ledger`` as ``version``; returns the file written (None: ephemeral)."""
        f = self._file(LEDGER, path_name=self.ledger_name)
        if f is None:
            return None
        f.write(wrap_versioned(version, ledger.to_bytes()))
        return f.path

    def load_ledger(self, max_probes: int = DEFAULT_MAX_PROBES) -> tuple[WatermarkLedger, int]:
        """The sealed ledger and its version (0 when there is none yet)."""
        f = self._file(LEDGER, path_name=self.ledger_name)
        if f is None or not f.exists():
            return WatermarkLedger(max_probes=max_probes), 0
        version, payload = unwrap_versioned(f.read())
        ledger = WatermarkLedger.from_bytes(payload)
        ledger.set_max_probes(max_probes)
        return ledger, version


def _spec(kind: str, width: int) -> OutputSpec:
    if kind == "probabilities":
        return OutputSpec.probabilities(width)
    if kind == "logits":
        return OutputSpec.logits(width)
    if kind == "score":
        return OutputSpec.score()
    raise ConfigError(f"output_kind must be probabilities, logits or score, not {kind!r}")


class LedgerSaver:
    """Writes the sealed ledger off the request path: a request that carried a mark
    only sets a flag; a background thread seals and writes the ledger at most once per
    ``interval_s`` (a crash loses at most that much of the ledger), and :meth:`close`
    writes it a last time. A failed write is logged and retried at the next mark."""

    def __init__(self, save: Callable[[], None], interval_s: float) -> None:
        self._save = save
        self._interval = interval_s
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def mark(self) -> None:
        self._dirty.set()
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._stop.is_set():
                    t = threading.Thread(target=self._run, name="sealserve-ledger", daemon=True)
                    t.start()
                    self._thread = t

    def _run(self) -> None:
        while True:
            self._dirty.wait()
            if self._stop.wait(self._interval):  # coalesce the marks of one interval
                return  # close() writes the last time
            self._dirty.clear()
            self._write()

    def _write(self) -> None:
        try:
            self._save()
        except Exception:  # a full disk must not stop serving
            log.exception("could not write the sealed watermark ledger; will retry")
            self._dirty.set()

    def close(self) -> None:
        """Stop the thread and write the ledger once more."""
        self._stop.set()
        self._dirty.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._write()


@dataclass
class DefenseSecrets:
    """What sealed state provides before the models load (the evidence's runtime keys
    record holds the audit public key, and key release sends that evidence)."""

    state: SealedState
    root_key: bytes
    ledger: WatermarkLedger
    audit_key: AuditKey | None
    save_interval_s: float = 2.0
    # The ledger's version; each save bumps it and records it in the audit log.
    ledger_version: int = 0
    audit: AuditLog | None = field(default=None, init=False, repr=False)
    _saver: LedgerSaver | None = field(default=None, init=False, repr=False)
    # One save at a time, snapshot taken inside: a slow older save can never land
    # after a newer one and put back an older ledger.
    _save_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @classmethod
    def open(cls, cfg: DefenseConfig, platform: Platform | None) -> DefenseSecrets:
        state = SealedState(platform, cfg.state_dir)
        root = state.secret("defense-root-key", lambda: os.urandom(32))
        audit_key = None
        if cfg.audit.enabled:
            audit_key = AuditKey.from_private_bytes(
                state.secret("audit-key", lambda: AuditKey.generate().to_private_bytes())
            )
            if cfg.state_dir is not None:
                cfg.state_dir.mkdir(parents=True, exist_ok=True)
                (cfg.state_dir / "audit-public.pem").write_bytes(audit_key.public_key_pem())
        ledger, version = state.load_ledger(cfg.watermark_probes)
        return cls(state, root, ledger, audit_key, cfg.ledger_save_interval_s, version)

    def for_worker(self, index: int) -> DefenseSecrets:
        """The same keys, with worker ``index``'s own sealed ledger file (one writer per
        file; ``watermark verify`` reads their union). Call in the forked worker."""
        state = SealedState(self.state.platform, self.state.directory, ledger_file(index))
        ledger, version = state.load_ledger(self.ledger.max_probes)
        return DefenseSecrets(state, self.root_key, ledger, self.audit_key,
                              self.save_interval_s, version)  # fmt: skip

    def save_ledger(self) -> None:
        """Seal and write the ledger now, then bind its new version into the audit log."""
        with self._save_lock:
            path = self.state.save_ledger(self.ledger, self.ledger_version + 1)
            if path is None:
                return
            self.ledger_version += 1
            if self.audit is not None and not self.audit.closed:
                self.audit.append_sealed_at_time(
                    time.time(), name=self.state.ledger_name, version=self.ledger_version,
                    sha256=file_sha256(path),
                )  # fmt: skip

    def note_marked(self) -> None:
        """An answer carried a watermark: write the ledger soon, off the request path."""
        if self._saver is None:
            self._saver = LedgerSaver(self.save_ledger, self.save_interval_s)
        self._saver.mark()

    def close(self) -> None:
        """Write the ledger a last time (at shutdown)."""
        if self._saver is not None:
            self._saver.close()
        else:
            self.save_ledger()


def build_defenses(
    cfg: DefenseConfig,
    secrets: DefenseSecrets,
    *,
    engine: Engine,
    store: BlobStore | None,
    quota: QuotaGuard | None,
    audit_dir: Path | None = None,
) -> OutputDefenses:
    """Profiles, detectors, response policy and audit log for the loaded models
    (the log in ``audit_dir``, default ``[defense.audit] dir``).

    Raises ConfigError naming the model and key for anything that cannot apply.
    """
    root, ledger = secrets.root_key, secrets.ledger
    shared: BlobStore = store if store is not None else MemoryBlobStore()
    if store is None:
        log.warning("detector state is per-process (no state store configured)")
    # Detector state is held in process and written behind (defense/detect/cache.py);
    # statuses and forgiveness epochs go to the store directly.
    detector_state = StateCache(shared, flush_s=cfg.detector_state_flush_s)
    models: dict[str, ModelDefense] = {}
    for name, mc in cfg.models.items():
        try:
            loaded = engine.resolve(name)
        except Exception as exc:
            raise ConfigError(f"[defense.models.{name}]: no such model is served") from exc
        info = loaded.info
        outs = {s.name: s for s in info.outputs}
        if mc.output not in outs:
            raise ConfigError(f"[defense.models.{name}] output {mc.output!r} is not an output")
        if mc.label is not None and mc.label not in outs:
            raise ConfigError(f"[defense.models.{name}] label {mc.label!r} is not an output")
        for extra in mc.unsafe_undefended_outputs:
            if extra not in outs:
                raise ConfigError(
                    f"[defense.models.{name}] unsafe_undefended_outputs: {extra!r} is not an output"
                )
        if mc.unsafe_undefended_outputs:
            log.warning("model %s: outputs %s are served UNDEFENDED (unsafe_undefended_outputs)",
                        name, ", ".join(mc.unsafe_undefended_outputs))  # fmt: skip
        width = outs[mc.output].shape[-1] if len(outs[mc.output].shape) > 1 else 1
        spec = _spec(mc.output_kind, max(width, 1))
        n_features = _input_width(info, mc.input)
        profiles = {}
        for tier, pname in [(None, mc.profile), *mc.tiers.items()]:
            if pname == "none":
                continue
            profile = (
                Profile.default(spec, name="default")
                if pname == "default" and "default" not in cfg.profiles
                else Profile.from_mapping(pname, cfg.profiles[pname], output=spec)
            )
            key = derive_key(root, f"{name}/{pname}")
            profiles[tier] = profile.bind(key=key, ledger=ledger)
        suite = None
        if mc.detection:
            suite = _suite(mc, name, n_features, spec.num_classes, detector_state, loaded)
        only = info.inputs[0].name if len(info.inputs) == 1 else ""
        models[name] = ModelDefense(
            model=name,
            input_name=mc.input or only,
            output_name=mc.output,
            label_name=mc.label,
            profiles=profiles,
            suite=suite,
            unsafe_undefended_outputs=frozenset(mc.unsafe_undefended_outputs),
        )
    audit = None
    if secrets.audit_key is not None:
        audit_dir = audit_dir or cfg.audit.dir
        audit_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        audit = AuditLog.open(
            audit_dir, secrets.audit_key, checkpoint_every=cfg.audit.checkpoint_every,
            checkpoint_interval_s=cfg.audit.checkpoint_interval_s,
            refusals=RefusalCounter(cfg.audit.refusals_per_interval, cfg.audit.refusal_interval_s),
        )  # fmt: skip
        bind_audit_state(cfg, secrets, audit, quota)
    policy = ResponsePolicy.from_mapping(cfg.response) if cfg.response else ResponsePolicy.default()
    responses = Responses(
        policy, cfg.throttle_factor, cfg.challenge_difficulty, lift_grace_s=cfg.lift_grace_s,
        repeat_bits=cfg.challenge_repeat_bits, batch_rows=cfg.batch_scoring_rows,
        cohort=cfg.cohort_detection, cohort_difficulty=cfg.cohort_challenge_difficulty,
    )  # fmt: skip
    return OutputDefenses(
        models, responses=responses, quota=quota, audit=audit, on_marked=secrets.note_marked,
        blobs=shared, detector_state=detector_state, beside=cfg.detection_mode == "beside",
        max_pending=cfg.detection_queue_rows,
        # A store that waits on I/O: groups run off the event loop (as release does).
        beside_off_loop=bool(getattr(store, "blocking", False)),
    )  # fmt: skip


def bind_audit_state(
    cfg: DefenseConfig, secrets: DefenseSecrets, audit: AuditLog, quota: QuotaGuard | None
) -> None:
    """Audit hooks at start: the ledger's version against the log (a rolled-back ledger
    raises a signed alarm), statuses the state store lost re-applied from the log."""
    now = time.time()
    secrets.audit = audit
    if not secrets.state.ephemeral and cfg.state_dir is not None:
        name = secrets.state.ledger_name
        path = cfg.state_dir / name
        check_sealed_version(audit, name=name, version=secrets.ledger_version, path=path,
                             now=now)  # fmt: skip
    if quota is not None:
        reapply_statuses(audit, quota, now=now, throttle_factor=cfg.throttle_factor,
                         challenge_difficulty=cfg.challenge_difficulty)  # fmt: skip


def _input_width(info: Any, name: str | None) -> int:
    width = 0
    for s in info.inputs:
        if name is not None and s.name != name:
            continue
        dims = [d for d in s.shape[1:]]
        if any(d < 0 for d in dims):
            raise ConfigError(f"input {s.name!r} has dynamic feature dims: detectors need fixed")
        width += int(np.prod(dims)) if dims else 1
    if width == 0:
        raise ConfigError(f"input {name!r} not found")
    return width


def _suite(
    mc: ModelDefenseConfig, model: str, n_features: int, n_classes: int, blobs: BlobStore,
    loaded: Any,
) -> DetectorSuite:  # fmt: skip
    detectors: list[Any] = [
        PradaDetector(PradaConfig.from_mapping(
            {"n_features": n_features, "n_classes": n_classes, **mc.prada}), blobs),
        VolumeDetector(VolumeConfig.from_mapping(mc.volume), blobs),
    ]  # fmt: skip
    if mc.reference is not None:
        try:
            with np.load(mc.reference) as data:
                ref = np.asarray(data["x"], dtype=np.float64)
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"[defense.models.{model}] reference {mc.reference}: {exc}") from exc
        ref = ref.reshape(len(ref), -1)
        feed = {loaded.info.inputs[0].name: ref.astype(loaded.info.inputs[0].dtype)}
        outs = loaded.run(feed)
        probs = outs[[s.name for s in loaded.info.outputs].index(mc.output)]
        labels = np.argmax(probs, axis=1) if probs.ndim == 2 else (probs.reshape(-1) >= 0.5)
        detectors.insert(1, DistributionDetector(
            DistributionConfig.from_mapping(
                {"n_features": n_features, "n_classes": n_classes, **mc.distribution}),
            blobs, ref, reference_labels=np.asarray(labels, dtype=np.int64),
        ))  # fmt: skip
    else:
        log.warning("model %s: no reference sample: the distribution detector is off", model)
    return DetectorSuite(detectors)
