"""Band marks on the demo task: the exact null, a label-only replica proven, honest
agreement, the batch-of-one path, the ledger format, and bad config refused.

bench/bench_watermark_band.py prints the full power table (bench/RESULTS.md).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier

from sealserve.defense.outputs import OutputSpec
from sealserve.defense.release.profile import Profile
from sealserve.defense.watermark.band import BandSpec, band_test, evalue_bound
from sealserve.defense.watermark.ledger import LEDGER_MAGIC, WatermarkLedger
from sealserve.defense.watermark.verify import to_labels, verify
from sealserve.errors import ConfigError
from tests.defense import digits_task as dt

BAND = {"margin": 0.3, "rate": 0.05}


def band_profile() -> Profile:
    return dt.default_profile(watermark={"fraction": 0.002, "band": BAND})


def key_of(i: int) -> bytes:
    return hmac.digest(b"band-test-keys!!", i.to_bytes(4, "big"), "sha256")


@pytest.fixture(scope="module")
def task() -> dt.Digits:
    return dt.load()


@pytest.fixture(scope="module")
def stolen(task: dt.Digits) -> tuple[np.ndarray, np.ndarray, WatermarkLedger]:
    """1,000 natural (augmented) queries answered by the defended server."""
    ledger = WatermarkLedger()
    q = dt.augment(task.x_pool, 1000, seed=3)
    bound = band_profile().bind(key=dt.KEY, ledger=ledger)
    r = bound.apply_at_time(task.proba(q), inputs=q, account="thief", model="digits", now=0.0)
    return q, np.argmax(r.values, axis=1), ledger


def labels_of(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: np.asarray(model.predict(x / 16.0))


def test_a_band_flip_gives_the_runner_up_the_same_for_every_account(task: dt.Digits) -> None:
    q = dt.augment(task.x_pool, 600, seed=5)
    p = task.proba(q)
    bound = band_profile().bind(key=dt.KEY, ledger=WatermarkLedger())
    a = bound.apply_at_time(p, inputs=q, account="a", model="digits", now=0.0)
    b = bound.apply_at_time(p, inputs=q, account="b", model="digits", now=0.0)
    assert a.band is not None and int(a.band.sum()) >= 3
    assert b.band is not None and np.array_equal(a.band, b.band)
    order = np.argsort(-p, axis=1)
    rows = np.flatnonzero(a.band)
    assert np.array_equal(np.argmax(a.values[rows], 1), order[rows, 1])  # the runner-up
    assert not np.any(a.band & a.marked)  # DAWN rows are left alone
    margin = np.take_along_axis(p, order[:, :2], 1) @ np.array([1.0, -1.0])
    assert np.all(margin[rows] < BAND["margin"])


def test_batch_of_one_path_equals_the_batch_path(task: dt.Digits) -> None:
    q = dt.augment(task.x_pool, 300, seed=6)
    p = task.proba(q)
    one, many = WatermarkLedger(), WatermarkLedger()
    bound_one = band_profile().bind(key=dt.KEY, ledger=one)
    bound_many = band_profile().bind(key=dt.KEY, ledger=many)
    batch = bound_many.apply_at_time(p, inputs=q, account="t", model="digits", now=0.0)
    singles = [
        bound_one.apply_at_time(
            p[i : i + 1], inputs=q[i : i + 1], account="t", model="digits", now=0.0
        )
        for i in range(len(q))
    ]
    assert np.array_equal(np.argmax(batch.values, 1), [int(s.values.argmax()) for s in singles])
    flips = [s.band is not None and bool(s.band[0]) for s in singles]
    assert batch.band is not None and np.array_equal(batch.band, flips)
    assert [r.cell for r in one.band_rows()] == [r.cell for r in many.band_rows()]
    assert len(many.band_rows()) > 20


def test_label_only_replica_of_1000_answers_is_proven(
    stolen: tuple[np.ndarray, np.ndarray, WatermarkLedger],
) -> None:
    q, y, ledger = stolen
    replicas = {
        "LR": LogisticRegression(C=10, max_iter=2000),
        "MLP": MLPClassifier((64,), max_iter=300, random_state=0),
    }
    for name, model in replicas.items():
        rep = verify(ledger, labels_of(model.fit(q / 16.0, y)), model="digits")
        b = rep.band
        assert b is not None and rep.signal is not None and rep.marks_p_value is not None
        print(f"\n{name} replica: band k={b.hits} of |D|={b.runner_up}, p={b.p_value:.3g}; "
              f"all three tests (Bonferroni) p={rep.p_value:.3g}")  # fmt: skip
        assert b.p_value < 1e-6
        assert b.accounts == ["thief"]
        assert rep.p_value == min(1.0, 3 * min(b.p_value, rep.marks_p_value, rep.signal.p_value))
        assert "band marks" in rep.render()
        assert json.loads(rep.to_json())["band"]["hits"] == b.hits


def test_exact_null_innocent_models_many_keys(
    task: dt.Digits, stolen: tuple[np.ndarray, np.ndarray, WatermarkLedger]
) -> None:
    """Models that never saw a band-marked answer, tested under 200 keys each: the
    rate at p <= 0.01 stays about 1% (an exact test allows it), nothing near 1e-6."""
    rows = stolen[2].band_rows(model="digits")
    x = np.stack([r.input for r in rows])
    xo, yo = task.x_owner / 16.0, task.y_owner
    models: list[Any] = [
        LogisticRegression(C=1.0, max_iter=500).fit(xo, yo),
        KNeighborsClassifier(1).fit(xo, yo),
        GaussianNB().fit(xo, yo),
        RandomForestClassifier(30, random_state=0).fit(xo, yo),
        MLPClassifier((32,), max_iter=200, random_state=1).fit(xo, yo),
    ]
    ps = []
    for m in models:
        lab = m.predict(x / 16.0)
        table = {r.cell: int(v) for r, v in zip(rows, lab, strict=True)}
        by_input = {r.input.tobytes(): table[r.cell] for r in rows}

        def suspect(z: np.ndarray, t: dict[bytes, int] = by_input) -> np.ndarray:
            return np.array([t[r.astype(rows[0].input.dtype).tobytes()] for r in z])

        for k in range(200):
            spec = BandSpec("digits", key_of(k), BAND["margin"], BAND["rate"])
            ps.append(band_test(spec, rows, suspect, to_labels=to_labels).p_value)
    a = np.array(ps)
    print(f"\n{len(a)} innocent tests: p<=0.01 {np.mean(a <= 0.01):.2%}, min p {a.min():.2g}")
    assert len(a) == 1000
    assert np.mean(a <= 0.01) <= 0.02
    assert np.mean(a <= 0.05) <= 0.08
    assert a.min() > 1e-4


def test_honest_agreement_mean_over_keys(task: dt.Digits) -> None:
    clean = task.proba(task.x_test)
    want = np.argmax(clean, 1)
    prof = band_profile()
    agree = []
    for k in range(100):
        r = prof.bind(key=key_of(k), ledger=WatermarkLedger()).apply_at_time(
            clean, inputs=task.x_test, account="honest", model="digits", now=0.0
        )
        agree.append(float(np.mean(np.argmax(r.values, 1) == want)))
    print(f"\nhonest agreement with band marks: mean {np.mean(agree):.4f}, min {min(agree):.4f}")
    assert np.mean(agree) >= 0.995


def test_ledger_v3_round_trip_and_v2_still_verifies(
    stolen: tuple[np.ndarray, np.ndarray, WatermarkLedger],
) -> None:
    ledger = stolen[2]
    data = ledger.to_bytes()
    assert data[len(LEDGER_MAGIC)] == 3
    back = WatermarkLedger.from_bytes(data)
    assert back.band("digits") == ledger.band("digits")
    assert [(r.cell, r.top1, r.top2) for r in back.band_rows()] == [
        (r.cell, r.top1, r.top2) for r in ledger.band_rows()
    ]
    # A version-2 ledger (written before band marks) still parses and verifies.
    body = json.loads(data[len(LEDGER_MAGIC) + 1 :])
    for k in ("band", "bands", "max_band_rows"):
        del body[k]
    old = WatermarkLedger.from_bytes(LEDGER_MAGIC + bytes([2]) + json.dumps(body).encode())
    assert old.band_rows() == [] and old.band("digits") is None
    copy = {e.input.tobytes(): e.label for e in old.entries()}
    rep = verify(old, lambda z: np.array([copy.get(r.tobytes(), 0) for r in z]), model="digits")
    assert rep.band is None and rep.marks_p_value is not None


def test_per_account_cap_keeps_the_first_cells(task: dt.Digits) -> None:
    ledger = WatermarkLedger(max_band_rows=5)
    q = dt.augment(task.x_pool, 400, seed=8)
    band_profile().bind(key=dt.KEY, ledger=ledger).apply_at_time(
        task.proba(q), inputs=q, account="a", model="digits", now=0.0
    )
    assert len(ledger.band_rows(account="a")) == 5


def test_evalue_bound_is_never_below_the_binomial_p() -> None:
    from scipy.stats import binom

    for k, m in ((0, 10), (3, 10), (8, 12), (5, 100)):
        p = float(binom.sf(k - 1, m, 0.05)) if k else 1.0
        assert evalue_bound(k, m, 0.05) >= p


@pytest.mark.parametrize(
    ("band", "message"),
    [
        ({"margin": 0, "rate": 0.05}, "band.margin must be in (0, 1]"),
        ({"margin": 1.5, "rate": 0.05}, "band.margin must be in (0, 1]"),
        ({"margin": 0.3, "rate": 0.0}, "band.rate must be in (0, 0.2]"),
        ({"margin": 0.3, "rate": 0.5}, "band.rate must be in (0, 0.2]"),
        ({"margin": "wide", "rate": 0.05}, "band.margin must be a number, got 'wide'"),
        ({"margin": 0.3, "rate": True}, "band.rate must be a number, got True"),
        ({"margin": 0.3, "width": 2}, "unknown key(s) in band: width"),
        ("yes", "band must be a table, got 'yes'"),
    ],
)
def test_bad_band_config_is_refused(band: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        Profile.from_mapping("p", {"watermark": {"band": band}}, output=dt.SPEC)
    assert message in err.value.message
    assert err.value.message.startswith("defense profile 'p'")


def test_band_needs_probability_outputs() -> None:
    with pytest.raises(ConfigError, match="watermark.band needs probability outputs"):
        Profile.from_mapping("p", {"watermark": {"band": BAND}}, output=OutputSpec.logits(10))


def test_thief_split_over_accounts_is_found_among_honest_ones(task: dt.Digits) -> None:
    """10 thief accounts hidden among 10 honest ones: pooling by the suspect's top-1 fit
    (coin-free) picks thief accounts only; an unknown pooling rule is refused."""
    ledger = WatermarkLedger()
    bound = band_profile().bind(key=dt.KEY, ledger=ledger)
    q = dt.augment(task.x_pool, 1000, seed=3)
    honest = dt.augment(task.x_test, 1000, seed=11)
    y = np.empty(len(q), dtype=np.int64)
    for i, idx in enumerate(np.array_split(np.arange(1000), 10)):
        r = bound.apply_at_time(task.proba(q[idx]), inputs=q[idx], account=f"thief{i}",
                                model="digits", now=0.0)  # fmt: skip
        y[idx] = np.argmax(r.values, 1)
        bound.apply_at_time(task.proba(honest[idx]), inputs=honest[idx], account=f"honest{i}",
                            model="digits", now=0.0)  # fmt: skip
    replica = MLPClassifier((64,), max_iter=300, random_state=0).fit(q / 16.0, y)
    rep = verify(ledger, labels_of(replica), model="digits")
    assert rep.band is not None and rep.band.accounts
    assert all(a.startswith("thief") for a in rep.band.accounts)
    everyone = verify(ledger, labels_of(replica), model="digits", band_pool="all")
    assert everyone.band is not None and everyone.band.runner_up > rep.band.runner_up
    print(f"\npicked {len(rep.band.accounts)} thief accounts: p={rep.band.p_value:.3g}; "
          f"all 20 pooled: p={everyone.band.p_value:.3g}")  # fmt: skip
    with pytest.raises(ConfigError, match="band_pool must be 'fit' or 'all'"):
        verify(ledger, labels_of(replica), model="digits", band_pool="some")


def test_a_recorded_band_row_asks_for_the_ledger_to_be_saved(task: dt.Digits) -> None:
    """Band rows are recorded without any DAWN mark in the batch: the pipeline must still
    tell the server that the sealed ledger changed."""
    from sealserve.defense.release.pipeline import ModelDefense, OutputDefenses

    ledger = WatermarkLedger()
    bound = band_profile().bind(key=dt.KEY, ledger=ledger)
    saved: list[int] = []
    defenses = OutputDefenses(
        {"digits": ModelDefense("digits", "input", "probs", profiles={None: bound})},
        on_marked=lambda: saved.append(1),
    )
    q = dt.augment(task.x_pool, 300, seed=12)
    p = task.proba(q)
    margin = np.diff(np.sort(p, axis=1)[:, -2:], axis=1).ravel()
    i = int(np.flatnonzero(margin < 0.3)[0])
    defenses.release("a", None, "digits", {"input": q[i : i + 1]}, {"probs": p[i : i + 1]})
    assert len(ledger.band_rows()) == 1 and len(ledger) == 0
    assert saved == [1]
