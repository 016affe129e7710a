"""The verifier's statistics, its refusals, reports, replica check and ONNX adapter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sealserve.defense.outputs import OutputSpec
from sealserve.defense.release.profile import Profile
from sealserve.defense.watermark.ledger import LedgerEntry, WatermarkLedger
from sealserve.defense.watermark.replica import boundary_inputs, replica_check
from sealserve.defense.watermark.suspect import OnnxSuspect
from sealserve.defense.watermark.verify import to_labels, verify
from sealserve.errors import ConfigError, InputError

KEY = b"v" * 32


def make_ledger(
    n: int = 400, fraction: float = 0.1, seed: int = 0
) -> tuple[WatermarkLedger, np.ndarray, np.ndarray]:
    """A ledger over random inputs of a 'model' whose top-1 is input[0] mod 10."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 17, (n, 64)).astype(np.float64)
    top1 = x[:, 0].astype(int) % 10
    p = np.full((n, 10), 0.02)
    p[np.arange(n), top1] = 0.82
    ledger = WatermarkLedger()
    prof = Profile.from_mapping(
        "v",
        {"coarsen": {"input_scale": 16.0}, "watermark": {"fraction": fraction, "signal": 0}},
        output=OutputSpec.probabilities(10),
    )
    prof.bind(key=KEY, ledger=ledger).apply_at_time(p, inputs=x, account="t", model="m", now=0.0)
    return ledger, x, top1


def test_a_copy_of_the_answers_is_proven() -> None:
    ledger, _, _ = make_ledger()
    table = {e.input.tobytes(): e.label for e in ledger.entries()}
    rep = verify(ledger, lambda x: np.array([table[r.tobytes()] for r in x]))
    assert rep.matches == rep.cells == len(ledger) > 20
    assert rep.watermark_present and rep.p_value < 1e-20
    assert "WATERMARK PRESENT" in rep.render()
    body = json.loads(rep.to_json())
    assert body["matches"] == rep.matches and body["watermark_present"] is True


def test_key_randomised_null_makes_no_false_claims() -> None:
    """Innocent 'models' that disagree with the top-1 at random, a lot: the p-value stays
    valid (uniform-ish), so p < 0.01 happens at most about 1% of the time."""
    ledger, _, _ = make_ledger(2000, 0.05)
    n = len(ledger)
    small = 0
    for seed in range(300):
        rng = np.random.default_rng(1000 + seed)
        orig = np.array([e.original for e in ledger.entries()])
        # Disagrees on ~60% of entries, picking any other label (biased towards label 3).
        noisy = np.where(rng.random(n) < 0.6, rng.choice([3, 3, 3, 5, 7], n), orig)
        rep = verify(ledger, lambda _x, lab=noisy: lab, num_classes=10)
        small += rep.p_value < 0.01
        assert rep.matches < 0.3 * n
    assert small <= 9  # 300 tests at 1%: expect ~3, allow noise


def test_num_classes_is_inferred_from_probabilities() -> None:
    ledger, _, _top1 = make_ledger()
    onehot = lambda x: np.eye(10)[x[:, 0].astype(int) % 10]  # noqa: E731
    rep = verify(ledger, onehot)
    assert rep.matches == 0 and rep.trials == 0 and rep.p_value == 1.0
    assert rep.chance_rate == 0.0
    assert "no evidence" in rep.render()


def test_duplicate_cells_count_once() -> None:
    ledger, _, _ = make_ledger()
    e = ledger.entries()[0]
    ledger.append(LedgerEntry(**{**e.__dict__, "account": "other"}))
    rep = verify(ledger, lambda x: np.zeros(len(x), dtype=np.int64), num_classes=10)
    assert rep.entries == rep.cells + 1


def score_ledger() -> tuple[WatermarkLedger, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, (3000, 8))
    s = 1 / (1 + np.exp(-3 * x[:, 0]))
    ledger = WatermarkLedger()
    prof = Profile.from_mapping("s", {"watermark": {"fraction": 0.02}}, output=OutputSpec.score())
    prof.bind(key=KEY, ledger=ledger).apply_at_time(
        s, inputs=x, account="t", model="fraud", now=0.0
    )
    return ledger, x, s


def test_scores_need_controls_and_then_test_honestly() -> None:
    ledger, _x, _ = score_ledger()
    original = lambda z: 1 / (1 + np.exp(-3 * z[:, 0]))  # noqa: E731
    with pytest.raises(ConfigError, match="give original= and controls="):
        verify(ledger, original)
    controls = np.random.default_rng(9).normal(0, 1, (2000, 8))
    innocent = lambda z: 1 / (1 + np.exp(-3 * (z[:, 0] + 0.1 * z[:, 1])))  # noqa: E731
    rep = verify(ledger, innocent, original=original, controls=controls)
    assert not rep.watermark_present and rep.p_value > 0.01
    assert "controls" in rep.chance_method
    table = {e.input.tobytes(): e.answer[0] for e in ledger.entries()}
    copy = lambda z: np.array([table.get(r.tobytes(), original(r[None])[0]) for r in z])  # noqa: E731
    stolen = verify(ledger, copy, original=original, controls=controls)
    assert stolen.watermark_present and stolen.matches == stolen.cells


def test_verify_refusals() -> None:
    ledger, _, _ = make_ledger()
    with pytest.raises(InputError, match="no watermark entries for this model/account"):
        verify(ledger, lambda x: x, account="nobody")
    with pytest.raises(InputError, match=r"returned 1 answers for \d+ inputs"):
        verify(ledger, lambda x: np.zeros(1, dtype=np.int64))
    with pytest.raises(InputError, match="not labels"):
        verify(ledger, lambda x: np.zeros((len(x), 2, 2)))
    with pytest.raises(ConfigError, match="alpha must be in"):
        verify(ledger, lambda x: x, alpha=2.0)
    e = ledger.entries()[0]
    ledger.append(LedgerEntry(**{**e.__dict__, "model": "m2"}))
    with pytest.raises(InputError, match="mixes models"):
        verify(ledger, lambda x: x)


def test_to_labels() -> None:
    assert to_labels(np.array([2, 0])).tolist() == [2, 0]
    assert to_labels(np.array([[0.1, 0.9], [0.8, 0.2]])).tolist() == [1, 0]
    assert to_labels(np.array([[0.7], [0.2]]), kind="score").tolist() == [1, 0]
    assert to_labels(np.array([1.0, 0.0])).tolist() == [1, 0]


def test_replica_check_with_fixed_baseline() -> None:
    x = np.random.default_rng(0).normal(0, 1, (200, 4))
    original = lambda z: np.stack([z[:, 0], z[:, 1], z[:, 2]], axis=1)  # noqa: E731
    copy = lambda z: original(z) + 0.01  # noqa: E731
    near = boundary_inputs(original, x, count=20)
    rep = replica_check(
        original, copy, {"boundary": near, "natural": x}, baseline={"boundary": 0.5}
    )
    assert rep.replica_likely and rep.probes[0].agreement == 1.0
    assert rep.probes[1].baseline_mean is None
    assert "the suspect behaves like a replica" in rep.render()
    with pytest.raises(InputError, match="probe set 'empty' is empty"):
        replica_check(original, copy, {"empty": x[:0]})


def test_onnx_suspect(tmp_path: Path) -> None:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (300, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int) + (x[:, 2] > 1)
    model = LogisticRegression().fit(x, y)
    path = tmp_path / "suspect.onnx"
    path.write_bytes(to_onnx(model, x[:1], options={"zipmap": False}).SerializeToString())
    suspect = OnnxSuspect(path)
    out = suspect(x[:50].astype(np.float64))
    assert out.shape == (50, 3)
    assert np.array_equal(np.argmax(out, 1), model.predict(x[:50]))
    zipped = tmp_path / "zip.onnx"
    zipped.write_bytes(to_onnx(model, x[:1]).SerializeToString())
    assert np.allclose(OnnxSuspect(zipped)(x[:5]), out[:5], atol=1e-5)
    with pytest.raises(InputError, match="cannot load suspect model"):
        OnnxSuspect(tmp_path / "missing.onnx")
    with pytest.raises(InputError, match="the suspect model failed on the probe inputs"):
        suspect(np.zeros((2, 7)))
