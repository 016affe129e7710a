"""The signal watermark: the tilt, its probes in the ledger, and its exact test."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import kstest

from sealserve.defense.outputs import OutputSpec
from sealserve.defense.release.profile import Profile
from sealserve.defense.watermark.ledger import LEDGER_MAGIC, ProbeEntry, WatermarkLedger
from sealserve.defense.watermark.signal import SignalSpec, log_scores
from sealserve.defense.watermark.verify import signal_test, verify
from sealserve.errors import ConfigError, SealedFormatError

KEY = b"s" * 32
P10 = OutputSpec.probabilities(10)


def probs(n: int, seed: int = 0) -> np.ndarray:
    z = np.random.default_rng(seed).normal(0, 2.0, (n, 10))
    e = np.exp(z - z.max(axis=1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def inputs(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 17, (n, 64)).astype(np.float64)


def profile(output: OutputSpec = P10, **wm: object) -> Profile:
    table = {"coarsen": {"input_scale": 16.0}, "preserve_top1": True,
             "watermark": {"fraction": 0.01, **wm}}  # fmt: skip
    if not output.is_score:
        table["renormalise"] = True
    return Profile.from_mapping("sig", table, output=output)


def test_default_strength_is_on_and_described() -> None:
    p = profile()
    assert p.watermark_signal == 3.0
    step = p.describe()["steps"][0]
    assert step["step"] == "watermark" and step["signal"] == 3.0
    assert profile(signal=0).watermark_signal == 0.0
    assert "signal" not in profile(signal=0).describe()["steps"][0]


@pytest.mark.parametrize(
    ("wm", "output", "message"),
    [
        ({"signal": -1}, P10, r"watermark.signal must be a number in \[0, 8.0\]"),
        ({"signal": 9}, P10, r"watermark.signal must be a number in \[0, 8.0\]"),
        ({"signal": "x"}, P10, "watermark.signal must be a number"),
        ({"signal": 1}, OutputSpec.score(bounds=None), "needs probabilities, logits or a score"),
    ],
)
def test_impossible_signal_is_refused(
    wm: dict[str, object], output: OutputSpec, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        profile(output, **wm)


def test_scores_default_to_a_gentler_signal() -> None:
    assert profile(OutputSpec.score(bounds=None)).watermark_signal == 0.0
    assert profile(OutputSpec.score()).watermark_signal == 0.5


def test_tilt_keeps_top1_sums_to_one_and_changes_answers() -> None:
    ledger = WatermarkLedger()
    b = profile().bind(key=KEY, ledger=ledger)
    p, x = probs(2000), inputs(2000)
    r = b.apply_at_time(p, inputs=x, account="a", model="m", now=0.0)
    unmarked = ~r.marked
    assert np.array_equal(r.values[unmarked].argmax(1), p[unmarked].argmax(1))
    assert np.allclose(r.values.sum(1), 1.0)
    change = np.abs(r.values[unmarked] - p[unmarked]).mean()
    # These random answers are far less confident than the demo model's (0.005 there).
    assert 0.001 < change < 0.1
    off = profile(signal=0).bind(key=KEY, ledger=WatermarkLedger())
    r0 = off.apply_at_time(p, inputs=x, account="a", model="m", now=0.0)
    assert np.allclose(r0.values[~r0.marked], p[~r0.marked], atol=1e-12)


def test_tilt_is_deterministic_and_jitter_proof() -> None:
    b = profile(signal=3).bind(key=KEY, ledger=WatermarkLedger())
    p, x = probs(300), inputs(300)
    first = b.apply_at_time(p, inputs=x, account="a", model="m", now=0.0)
    again = b.apply_at_time(p, inputs=x, account="a", model="m", now=1.0)
    jitter = x * (1 + np.random.default_rng(2).uniform(-1e-4, 1e-4, x.shape))
    moved = b.apply_at_time(p, inputs=jitter, account="a", model="m", now=2.0)
    assert np.array_equal(first.values, again.values)
    assert np.abs(first.values - moved.values).max() < 1e-3
    # Another model gets another tilt.
    other = b.apply_at_time(p, inputs=x, account="a", model="m2", now=3.0)
    assert np.abs(first.values - other.values).max() > 0.01


def test_nan_and_huge_inputs_give_finite_answers() -> None:
    b = profile().bind(key=KEY, ledger=WatermarkLedger())
    x = inputs(3)
    x[0, 0] = np.nan
    x[1] = 1e300
    x[2] = -1e300
    r = b.apply_at_time(probs(3), inputs=x, account="a", model="m", now=0.0)
    assert np.all(np.isfinite(r.values)) and np.allclose(r.values.sum(1), 1.0)


def test_scores_and_logits_are_tilted() -> None:
    s = np.linspace(0.05, 0.95, 200)
    b = profile(OutputSpec.score(), signal=3).bind(key=KEY, ledger=WatermarkLedger())
    r = b.apply_at_time(s.reshape(-1, 1), inputs=inputs(200), account="a", model="m", now=0.0)
    out = r.values.reshape(-1)
    keep = ~r.marked
    assert np.all((out[keep] > 0.5) == (s[keep] > 0.5)) and np.all((out >= 0) & (out <= 1))
    assert np.abs(out[keep] - s[keep]).mean() > 0.01
    lg = np.random.default_rng(0).normal(0, 3, (100, 10))
    bl = Profile.from_mapping(
        "l", {"coarsen": {"input_scale": 16.0}, "watermark": {"fraction": 0.01}},
        output=OutputSpec.logits(10),
    ).bind(key=KEY, ledger=WatermarkLedger())  # fmt: skip
    rl = bl.apply_at_time(lg, inputs=inputs(100), account="a", model="m", now=0.0)
    assert np.abs(rl.values[~rl.marked] - lg[~rl.marked]).mean() > 0.1


# -- probes in the ledger -------------------------------------------------------------


def test_probes_are_a_keyed_share_kept_nearest_the_boundary() -> None:
    ledger = WatermarkLedger(max_probes=100)
    b = profile().bind(key=KEY, ledger=ledger)
    p, x = probs(3000), inputs(3000)
    b.apply_at_time(p, inputs=x, account="a", model="m", now=0.0)
    kept = ledger.probes(account="a")
    assert len(kept) == 100
    top2 = np.sort(p, 1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    # About 20% of queries are candidates; the 100 kept are the nearest of them.
    assert max(k.margin for k in kept) < np.quantile(margins, 0.25)
    assert kept == sorted(kept, key=lambda k: k.margin)  # nearest first
    first = kept[0]
    row = int(np.flatnonzero((x == first.input).all(1))[0])
    assert first.label == int(p[row].argmax()) and first.margin == pytest.approx(margins[row])
    assert first.output is not None and np.allclose(first.output, p[row])
    # Repeating the same queries adds no duplicate cells.
    b.apply_at_time(p, inputs=x, account="a", model="m", now=1.0)
    assert [k.cell for k in ledger.probes(account="a")] == [k.cell for k in kept]
    assert ledger.signal("m") is not None and ledger.signal("other") is None


def test_ledger_with_probes_round_trips_and_reads_version_1() -> None:
    ledger = WatermarkLedger()
    profile().bind(key=KEY, ledger=ledger).apply_at_time(
        probs(200), inputs=inputs(200).astype(np.float32), account="a", model="m", now=1.0
    )
    back = WatermarkLedger.from_bytes(ledger.to_bytes())
    assert [p.cell for p in back.probes()] == [p.cell for p in ledger.probes()]
    a, b = ledger.probes()[0], back.probes()[0]
    assert np.array_equal(a.input, b.input) and a.input.dtype == b.input.dtype
    assert a.output is not None and b.output is not None and np.array_equal(a.output, b.output)
    assert back.signal("m") == ledger.signal("m")
    # A version-1 ledger (marks only) still opens.
    body = json.loads(ledger.to_bytes()[len(LEDGER_MAGIC) + 1 :])
    v1 = {"entries": body["entries"]}
    old = WatermarkLedger.from_bytes(LEDGER_MAGIC + b"\x01" + json.dumps(v1).encode())
    assert len(old) == len(ledger) and old.probes() == [] and old.signal("m") is None


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b["signals"][0].update(seed="00"),
        lambda b: b["signals"][0].update(input_scale=0),
        lambda b: b["probes"][0].update(margin=float("nan")),
        lambda b: b.update(max_probes=-1),
    ],
)
def test_tampered_signal_or_probe_is_refused(change) -> None:  # type: ignore[no-untyped-def]
    ledger = WatermarkLedger()
    profile().bind(key=KEY, ledger=ledger).apply_at_time(
        probs(100), inputs=inputs(100), account="a", model="m", now=1.0
    )
    body = json.loads(ledger.to_bytes()[len(LEDGER_MAGIC) + 1 :])
    change(body)
    with pytest.raises(SealedFormatError, match="malformed"):
        WatermarkLedger.from_bytes(LEDGER_MAGIC + b"\x02" + json.dumps(body).encode())


# -- the exact test -------------------------------------------------------------------


def _probes(n: int, seed: int = 3) -> list[ProbeEntry]:
    x = inputs(n, seed)
    p = probs(n, seed)
    return [ProbeEntry("a", "m", x[i], int(p[i].argmax()), 0.1, str(i), p[i]) for i in range(n)]


def test_null_is_exact_over_keys() -> None:
    """An innocent suspect is independent of the key: over 400 random keys its z is
    standard normal, in label and in score mode alike."""
    probes = _probes(300)
    rng = np.random.default_rng(9)
    labels = rng.integers(0, 10, 300)
    scores = probs(300, seed=11)  # some other model's probabilities
    zl, zs = [], []
    for k in range(400):
        spec = SignalSpec("m", k.to_bytes(32, "big"), 3.0, 16.0, 10)
        zl.append(signal_test(spec, probes, labels).z)
        zs.append(signal_test(spec, probes, scores).z)
    for z in (zl, zs):
        assert kstest(z, "norm").pvalue > 0.001
        assert np.mean(np.array(z) > 2.326) < 0.03  # p < 0.01 about 1% of the time


def test_a_suspect_that_learnt_the_tilt_is_caught() -> None:
    probes = _probes(400)
    spec = SignalSpec("m", b"k" * 32, 3.0, 16.0, 10)
    x = np.stack([p.input for p in probes])
    ref = log_scores(np.stack([np.asarray(p.output) for p in probes]), "probabilities")
    tilt = spec.features(x) @ spec.matrix(64).T * 0.5
    learnt = np.exp(ref + tilt + np.random.default_rng(1).normal(0, 1.0, ref.shape))
    learnt /= learnt.sum(1, keepdims=True)
    res = signal_test(spec, probes, learnt)
    assert res.mode == "scores" and res.p_value < 1e-6
    other = SignalSpec("m", b"q" * 32, 3.0, 16.0, 10)
    assert signal_test(other, probes, learnt).p_value > 1e-3


def test_verify_refuses_bad_suspect_labels_and_reports_signal() -> None:
    ledger = WatermarkLedger()
    profile().bind(key=KEY, ledger=ledger).apply_at_time(
        probs(2000), inputs=inputs(2000), account="a", model="m", now=0.0
    )
    from sealserve.errors import InputError

    with pytest.raises(InputError, match="label outside"):
        verify(ledger, lambda x: np.full(len(x), 12), account="a", num_classes=10)
    rep = verify(ledger, lambda x: probs(len(x), seed=5), account="a", num_classes=10)
    assert rep.signal is not None and rep.signal.probes >= 100
    assert "signal (keyed tilt)" in rep.render()
    assert json.loads(rep.to_json())["signal"]["mode"] == "scores"


def test_one_score_alone_gets_what_it_gets_in_a_batch() -> None:
    b = profile(OutputSpec.score(), signal=3).bind(key=KEY, ledger=WatermarkLedger())
    s = np.random.default_rng(3).uniform(0, 1, (200, 1))
    x = inputs(200)
    whole = b.apply_at_time(s, inputs=x, account="a", model="m", now=0.0).values
    for i in range(200):
        one = b.apply_at_time(s[i : i + 1], inputs=x[i : i + 1], account="a", model="m", now=0.0)
        assert np.allclose(one.values, whole[i : i + 1], rtol=0, atol=1e-12)


def test_lowering_the_probe_cap_keeps_the_nearest() -> None:
    ledger = WatermarkLedger(max_probes=200)
    profile().bind(key=KEY, ledger=ledger).apply_at_time(
        probs(3000), inputs=inputs(3000), account="a", model="m", now=0.0
    )
    before = ledger.probes(account="a")
    ledger.set_max_probes(50)
    after = ledger.probes(account="a")
    assert [p.cell for p in after] == [p.cell for p in before[:50]]
    with pytest.raises(ConfigError, match="max_probes"):
        ledger.set_max_probes(-1)


def test_score_model_signal_is_caught_on_a_copy_and_not_on_the_original() -> None:
    """End to end for a fraud-style score: a suspect that answers like our defended
    server is caught; the undefended model with its own small error is not."""
    rng = np.random.default_rng(8)
    w = rng.normal(0, 0.4, 64)
    x = inputs(4000, seed=9)

    def original(a: np.ndarray) -> np.ndarray:
        z = (a / 16.0 - 0.5) @ w
        return np.asarray(1.0 / (1.0 + np.exp(-z)))

    ledger = WatermarkLedger()
    b = profile(OutputSpec.score()).bind(key=KEY, ledger=ledger)  # default strength
    answers = b.apply_at_time(original(x).reshape(-1, 1), inputs=x, account="a", model="m",
                              now=0.0).values.reshape(-1)  # fmt: skip
    # The copy answers any input as the server does (same key, its own ledger).
    server = profile(OutputSpec.score()).bind(key=KEY, ledger=WatermarkLedger())

    def copy_of_server(a: np.ndarray) -> np.ndarray:
        r = server.apply_at_time(original(a).reshape(-1, 1), inputs=a, account="z", model="m",
                                 now=0.0)  # fmt: skip
        return np.asarray(r.values).reshape(-1)

    assert np.allclose(copy_of_server(x), answers)
    copy = verify(ledger, copy_of_server, account="a", original=original,
                  controls=inputs(500, seed=10))  # fmt: skip
    assert copy.signal is not None and copy.signal.mode == "scores"
    assert copy.signal.p_value < 1e-6
    noisy = verify(
        ledger, lambda a: np.clip(original(a) + rng.normal(0, 0.02, len(a)), 0, 1),
        account="a", original=original, controls=inputs(500, seed=10),
    )  # fmt: skip
    assert noisy.signal is not None and noisy.signal.p_value > 1e-3
