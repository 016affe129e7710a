"""Watermark selection, alternative answers and the sealed ledger."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealserve.defense.outputs import OutputSpec
from sealserve.defense.release.profile import Profile
from sealserve.defense.watermark.ledger import LEDGER_MAGIC, LEDGER_VERSION, WatermarkLedger
from sealserve.defense.watermark.marks import Watermark
from sealserve.errors import ConfigError, SealedFormatError

KEY = b"w" * 32
P10 = OutputSpec.probabilities(10)


def probs(n: int, seed: int = 0) -> np.ndarray:
    z = np.random.default_rng(seed).normal(0, 3.0, (n, 10))
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def inputs(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 17, (n, 64)).astype(np.float64)


def profile(
    fraction: float = 0.2, output: OutputSpec = P10, signal: float = 0.0, **extra: Any
) -> Profile:
    """The DAWN marks alone by default (the signal tilt has its own tests)."""
    return Profile.from_mapping(
        "wm",
        {
            "coarsen": {"input_scale": 16.0},
            "watermark": {"fraction": fraction, "signal": signal},
            **extra,
        },
        output=output,
    )


def test_fraction_is_respected_and_alternative_is_plausible() -> None:
    n = 20000
    ledger = WatermarkLedger()
    b = profile(0.05).bind(key=KEY, ledger=ledger)
    p, x = probs(n), inputs(n)
    r = b.apply_at_time(p, inputs=x, account="a", model="m", now=5.0)
    rate = r.marked.mean()
    assert 0.045 < rate < 0.055
    m = r.marked
    top1, new = np.argmax(p[m], 1), np.argmax(r.values[m], 1)
    assert np.all(new != top1)  # another label, never the true top-1
    # Plausible: the new top-1 carries the original confidence, the vector sums to 1.
    assert np.allclose(r.values[m].max(1), p[m].max(1))
    assert np.allclose(r.values[m].sum(1), 1.0)
    assert np.array_equal(r.values[~m], p[~m])
    # The alternative label is spread over the other classes.
    offsets = (new - top1) % 10
    assert set(offsets.tolist()) == set(range(1, 10))
    assert len(ledger) == m.sum()
    e = ledger.entries()[0]
    assert e.account == "a" and e.time == 5.0 and e.model == "m" and e.kind == "class"
    row = int(np.flatnonzero(m)[0])
    assert np.array_equal(e.input, x[row]) and np.allclose(e.answer, r.values[row])
    assert e.label == int(np.argmax(r.values[row])) and e.original == int(np.argmax(p[row]))
    assert e.prior == pytest.approx(p[row, e.label])


def test_repeat_and_jitter_return_the_same_alternative_for_any_account() -> None:
    ledger = WatermarkLedger()
    b = profile(0.2, noise={"scale": 0.02}, preserve_top1=True).bind(key=KEY, ledger=ledger)
    p, x = probs(500), inputs(500)
    first = b.apply_at_time(p, inputs=x, account="a", model="m", now=0.0)
    jitter = x * (1 + np.random.default_rng(2).uniform(-1e-4, 1e-4, x.shape))
    again = b.apply_at_time(p, inputs=jitter, account="a", model="m", now=1.0)
    other = b.apply_at_time(p, inputs=x, account="b", model="m", now=2.0)
    assert np.array_equal(first.values, again.values)
    assert np.array_equal(first.marked, other.marked)
    assert np.array_equal(np.argmax(first.values, 1), np.argmax(other.values, 1))
    # Other model, other selection.
    elsewhere = b.apply_at_time(p, inputs=x, account="a", model="m2", now=3.0)
    assert not np.array_equal(first.marked, elsewhere.marked)


def test_marked_label_survives_rounding_and_top_k() -> None:
    ledger = WatermarkLedger()
    b = profile(0.2, round=1, top_k={"k": 2, "mode": "omit"}).bind(key=KEY, ledger=ledger)
    p, x = probs(300), inputs(300)
    r = b.apply_at_time(p, inputs=x, account="a", model="m", now=0.0)
    labels = np.array([e.label for e in ledger.entries()])
    assert np.array_equal(r.indices[r.marked, 0], labels)
    assert ledger.entries()[0].answer.shape == (2, 2)


def test_scores_are_shifted_across_the_threshold() -> None:
    ledger = WatermarkLedger()
    spec = OutputSpec.score(threshold=0.5)
    b = profile(0.2, spec).bind(key=KEY, ledger=ledger)
    s = np.linspace(0.0, 1.0, 400)
    r = b.apply_at_time(s.reshape(-1, 1), inputs=inputs(400), account="a", model="m", now=0.0)
    m = r.marked
    out = r.values.reshape(-1)
    assert np.all((out[m] > 0.5) != (s[m] > 0.5))
    assert np.all(np.abs(out[m] - 0.5) >= 0.1 - 1e-12)
    assert np.all((out >= 0) & (out <= 1))
    assert [e.label for e in ledger.entries()] == (out[m] > 0.5).astype(int).tolist()


def test_watermark_constructor_validates() -> None:
    with pytest.raises(ConfigError, match=r"watermark.fraction must be in \(0, 0.2\], got 0.5"):
        Watermark(key=KEY, fraction=0.5, output=P10)
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        Watermark(key=b"short", fraction=0.01, output=P10)


# -- ledger ---------------------------------------------------------------------------


def filled_ledger() -> WatermarkLedger:
    ledger = WatermarkLedger()
    profile(0.2).bind(key=KEY, ledger=ledger).apply_at_time(
        probs(100), inputs=inputs(100).astype(np.float32), account="acct-1", model="m", now=7.5
    )
    profile(0.2).bind(key=KEY, ledger=ledger).apply_at_time(
        probs(50), inputs=inputs(50).astype(np.float32), account="acct-2", model="m", now=8.5
    )
    return ledger


def test_ledger_round_trip_and_filters() -> None:
    ledger = filled_ledger()
    data = ledger.to_bytes()
    assert data.startswith(LEDGER_MAGIC) and data[len(LEDGER_MAGIC)] == LEDGER_VERSION
    back = WatermarkLedger.from_bytes(data)
    assert len(back) == len(ledger) > 0
    for a, b in zip(ledger.entries(), back.entries(), strict=True):
        assert (a.account, a.time, a.model, a.label, a.original, a.cell) == (
            b.account,
            b.time,
            b.model,
            b.label,
            b.original,
            b.cell,
        )
        assert b.input.dtype == np.float32 and np.array_equal(a.input, b.input)
        assert np.array_equal(a.answer, b.answer)
    assert back.accounts() == ["acct-1", "acct-2"]
    assert all(e.account == "acct-2" for e in back.entries(account="acct-2"))


def test_sealed_round_trip() -> None:
    ledger = filled_ledger()
    key = AESGCM.generate_key(bit_length=256)
    nonce = b"\x00" * 12  # test only: one message per key

    def seal(b: bytes) -> bytes:
        return AESGCM(key).encrypt(nonce, b, b"ledger")

    def unseal(b: bytes) -> bytes:
        return AESGCM(key).decrypt(nonce, b, b"ledger")

    blob = seal(ledger.to_bytes())
    assert LEDGER_MAGIC not in blob  # nothing in plaintext
    assert len(WatermarkLedger.from_sealed(blob, unseal=unseal)) == len(ledger)
    tampered = bytearray(blob)
    tampered[20] ^= 1
    with pytest.raises(SealedFormatError, match="watermark ledger could not be unsealed"):
        WatermarkLedger.from_sealed(bytes(tampered), unseal=unseal)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"PK\x03\x04junk", "not a sealserve watermark ledger (bad magic)"),
        (LEDGER_MAGIC, "truncated"),
        (LEDGER_MAGIC + b"\x09{}", "version 9 is not supported"),
        (LEDGER_MAGIC + b"\x01{not json", "watermark ledger is malformed"),
        (LEDGER_MAGIC + b'\x01{"entries":[{"account":"a"}]}', "watermark ledger is malformed"),
    ],
)
def test_bad_ledgers_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(SealedFormatError) as err:
        WatermarkLedger.from_bytes(data)
    assert message in err.value.message
