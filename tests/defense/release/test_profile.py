"""Perturbation transforms and profile validation."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from sealserve.defense.outputs import OutputSpec
from sealserve.defense.release.coarsen import Coarsener
from sealserve.defense.release.profile import DEFAULT_PROFILE, Profile
from sealserve.defense.release.transforms import ReverseSigmoid
from sealserve.defense.watermark.ledger import WatermarkLedger
from sealserve.errors import ConfigError

KEY = b"k" * 32
P10 = OutputSpec.probabilities(10)
SCORE = OutputSpec.score(threshold=0.5)


def probs(n: int = 50, c: int = 10, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.0, (n, c))
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def inputs(n: int = 50, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 17, (n, 64)).astype(np.float64)


def bound(mapping: dict[str, Any], output: OutputSpec = P10, ledger: WatermarkLedger | None = None):  # type: ignore[no-untyped-def]
    mapping = {"coarsen": {"input_scale": 16.0}, **mapping}
    return Profile.from_mapping("t", mapping, output=output).bind(key=KEY, ledger=ledger)


def run(b: Any, out: np.ndarray, x: np.ndarray, account: str = "alice") -> Any:
    return b.apply_at_time(out, inputs=x, account=account, model="m", now=0.0)


def test_round() -> None:
    p = probs()
    r = run(bound({"round": 2}), p, inputs())
    assert r.form == "full"
    assert np.array_equal(r.values, np.round(p, 2))


def test_top_k_zero_keeps_the_k_largest() -> None:
    p = probs()
    r = run(bound({"top_k": {"k": 3, "mode": "zero"}}), p, inputs())
    assert np.all((r.values > 0).sum(axis=1) == 3)
    top3 = np.sort(p, axis=1)[:, -3:]
    assert np.allclose(np.sort(r.values, axis=1)[:, -3:], top3)


def test_top_k_omit_returns_values_and_indices() -> None:
    p = probs()
    r = run(bound({"top_k": {"k": 2, "mode": "omit"}}), p, inputs())
    assert r.form == "top_k" and r.values.shape == (50, 2) and r.indices.shape == (50, 2)
    assert np.array_equal(r.indices[:, 0], np.argmax(p, axis=1))
    assert np.allclose(r.values, np.take_along_axis(p, r.indices, axis=1))
    assert np.all(r.values[:, 0] >= r.values[:, 1])


def test_label_only() -> None:
    p = probs()
    r = run(bound({"label_only": True}), p, inputs())
    assert r.form == "label" and r.values.dtype == np.int64
    assert np.array_equal(r.values, np.argmax(p, axis=1))


def test_keyed_noise_is_deterministic_per_account_and_input() -> None:
    p, x = probs(), inputs()
    b = bound({"noise": {"dist": "gaussian", "scale": 0.05}})
    a1, a2 = run(b, p, x).values, run(b, p, x).values
    assert np.array_equal(a1, a2)  # a repeat gains nothing
    assert not np.allclose(a1, p)  # there is noise
    other = run(b, p, x, account="bob").values
    assert not np.allclose(other, a1)  # another account gets other noise


@pytest.mark.parametrize("dist", ["gaussian", "laplace"])
def test_jittered_input_gets_identical_noise(dist: str) -> None:
    p, x = probs(), inputs()
    b = bound({"noise": {"dist": dist, "scale": 0.05}})
    base = run(b, p, x).values
    rng = np.random.default_rng(7)
    relative = x * (1 + rng.uniform(-1e-4, 1e-4, x.shape))
    additive = x + rng.uniform(-0.4, 0.4, x.shape)  # well inside the unit cell
    assert np.array_equal(run(b, p, relative).values, base)
    assert np.array_equal(run(b, p, additive).values, base)
    moved = x.copy()
    moved[:, 0] += 1.0  # one feature in the next cell: a different input
    assert not np.allclose(run(b, p, moved).values, base)


def test_noise_scale_and_distribution() -> None:
    n = 4000
    p = np.full((n, 10), 0.5)  # stay away from the [0, 1] clip
    x = np.arange(n * 64, dtype=np.float64).reshape(n, 64)
    for dist, sd in (("gaussian", 0.05), ("laplace", 0.05 * np.sqrt(2))):
        z = run(bound({"noise": {"dist": dist, "scale": 0.05}}), p, x).values - 0.5
        assert abs(z.mean()) < 0.003
        assert abs(z.std() - sd) / sd < 0.05


def test_reverse_sigmoid_matches_lee_et_al_formula() -> None:
    p = probs()
    beta, gamma = 0.4, 0.6
    r = run(bound({"reverse_sigmoid": {"beta": beta, "gamma": gamma}}), p, inputs()).values
    logit = np.log(p / (1 - p))
    y = np.clip(p - beta * (1 / (1 + np.exp(-gamma * logit)) - 0.5), 0, 1)
    assert np.allclose(r, y / y.sum(axis=1, keepdims=True))
    assert np.allclose(ReverseSigmoid(beta, gamma)(p), r)


def test_preserve_top1_guarantees_the_label() -> None:
    p = probs(500)
    x = inputs(500)
    harsh = {
        "noise": {"dist": "laplace", "scale": 0.3},
        "reverse_sigmoid": {"beta": 0.9, "gamma": 2.0},
    }
    without = run(bound(harsh), p, x).values
    assert np.any(np.argmax(without, 1) != np.argmax(p, 1))  # the transforms do move it
    with_ = run(bound({**harsh, "preserve_top1": True, "renormalise": True, "round": 1}), p, x)
    assert np.array_equal(np.argmax(with_.values, 1), np.argmax(p, 1))


def test_renormalise_sums_to_one() -> None:
    r = run(
        bound({"noise": {"dist": "gaussian", "scale": 0.1}, "renormalise": True}), probs(), inputs()
    )
    assert np.allclose(r.values.sum(axis=1), 1.0)
    assert np.all(r.values >= 0)


def test_scalar_scores_both_shapes() -> None:
    rng = np.random.default_rng(3)
    s = rng.uniform(0, 1, 200)
    x = inputs(200)
    b = bound(
        {"noise": {"dist": "laplace", "scale": 0.1}, "preserve_top1": True, "round": 2}, SCORE
    )
    flat = run(b, s, x).values
    col = run(b, s.reshape(-1, 1), x).values
    assert flat.shape == (200,) and col.shape == (200, 1)
    assert np.array_equal(flat, col.reshape(-1))
    assert np.all((flat >= 0) & (flat <= 1))
    assert np.array_equal(flat > 0.5, s > 0.5)  # decision preserved
    assert not np.allclose(flat, np.round(s, 2))
    lab = run(bound({"label_only": True}, SCORE), s, x)
    assert np.array_equal(lab.values, (s > 0.5).astype(np.int64))


def test_logits_noise_and_omit() -> None:
    logits = np.random.default_rng(4).normal(0, 3, (30, 5))
    b = bound(
        {
            "noise": {"dist": "gaussian", "scale": 0.5},
            "preserve_top1": True,
            "top_k": {"k": 2, "mode": "omit"},
        },
        OutputSpec.logits(5),
    )
    r = run(b, logits, inputs(30))
    assert np.array_equal(r.indices[:, 0], np.argmax(logits, 1))


def test_engine_buffer_is_not_modified() -> None:
    p = probs()
    keep = p.copy()
    run(bound(DEFAULT_PROFILE, ledger=WatermarkLedger()), p, inputs())
    assert np.array_equal(p, keep)


def test_describe_is_json_and_holds_no_secret() -> None:
    prof = Profile.default(P10, coarsen={"input_scale": 16.0})
    d = prof.describe()
    text = json.dumps(d)
    assert [s["step"] for s in d["steps"]] == [
        "watermark",
        "keyed_noise",
        "renormalise",
        "preserve_top1",
        "round",
    ]
    assert d["coarsen"]["step"] == 1.0
    b = prof.bind(key=KEY, ledger=WatermarkLedger())
    assert b.describe() == d
    assert KEY.decode() not in text and KEY.hex() not in text


def test_coarsener_cells_are_centred() -> None:
    c = Coarsener.from_scale(input_scale=16.0)
    x = np.array([[0.0, 3.0, 3.49, 3.51, 16.0, np.nan, np.inf]])
    assert c.cells(x).tolist() == [[0, 3, 3, 4, 16, 2**53, 2**53]]


# -- validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mapping", "output", "message"),
    [
        (
            {"noise": {"dist": "gaussian", "scale": -1.0}},
            P10,
            "noise.scale must be a finite number > 0",
        ),
        (
            {"noise": {"dist": "uniform", "scale": 1.0}},
            P10,
            "noise.dist must be 'gaussian' or 'laplace'",
        ),
        ({"noise": {"dist": "gaussian"}}, P10, "missing required key 'scale'"),
        ({"top_k": 11}, P10, "top_k.k = 11 is larger than the model's 10 classes"),
        ({"top_k": 0}, P10, "top_k.k must be an integer >= 1"),
        ({"top_k": {"k": 2, "mode": "drop"}}, P10, "top_k.mode must be 'zero' or 'omit'"),
        ({"top_k": 1}, SCORE, "top_k does not apply to a score output"),
        ({"top_k": 2}, OutputSpec.logits(5), "mode 'zero' is meaningless for logits"),
        ({"renormalise": True}, SCORE, "renormalise applies only to probability outputs"),
        (
            {"reverse_sigmoid": {"beta": 0.5, "gamma": 1}},
            OutputSpec.logits(3),
            "reverse_sigmoid needs probabilities",
        ),
        ({"reverse_sigmoid": {"beta": -0.5, "gamma": 1}}, P10, "reverse_sigmoid.beta must be > 0"),
        ({"round": 11}, P10, "round.decimals must be in 0..10"),
        ({"round": 1.5}, P10, "round must be a table"),
        ({"watermark": {"fraction": 0.0}}, P10, "watermark.fraction must be in (0, 0.2]"),
        ({"watermark": {"fraction": 0.3}}, P10, "watermark.fraction must be in (0, 0.2]"),
        (
            {"watermark": {"fraction": 0.01, "margin": 0.6}},
            SCORE,
            "watermark.margin 0.6 does not fit",
        ),
        ({"label_only": True, "round": 2}, P10, "label_only returns labels"),
        ({"preserve_top1": "yes"}, P10, "preserve_top1 must be true or false"),
        ({"nosie": {"scale": 1}}, P10, "unknown key(s) nosie"),
        ({"noise": {"scale": 1, "sd": 2}}, P10, "unknown key(s) in noise: sd"),
        (
            {"output": "score"},
            P10,
            "is for 'score' outputs but the model's output is 'probabilities'",
        ),
        ({"coarsen": {"input_scale": 0}}, P10, "coarsen.input_scale must be a finite number > 0"),
    ],
)
def test_impossible_profiles_are_refused_at_build(
    mapping: dict[str, Any], output: OutputSpec, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        Profile.from_mapping("gold", mapping, output=output)
    assert "defense profile 'gold'" in err.value.message
    assert message in err.value.message


def test_bind_needs_key_and_ledger() -> None:
    prof = Profile.from_mapping("gold", {"noise": {"scale": 0.1}}, output=P10)
    with pytest.raises(ConfigError, match="needs a secret key of at least 16 bytes"):
        prof.bind(key=None)
    wm = Profile.from_mapping("gold", {"watermark": True}, output=P10)
    with pytest.raises(ConfigError, match="watermarks answers and needs a ledger"):
        wm.bind(key=KEY)
    plain = Profile.from_mapping("open", {"round": 2}, output=P10)
    assert plain.bind(key=None).describe()["steps"] == [{"step": "round", "decimals": 2}]


def test_output_of_the_wrong_shape_is_a_config_error() -> None:
    b = bound({"round": 2})
    with pytest.raises(
        ConfigError, match=r"expects a probabilities output with 10 value\(s\) per row"
    ):
        run(b, probs(c=3), inputs())
    with pytest.raises(ConfigError, match="batch mismatch: 3 inputs but 50 outputs"):
        run(b, probs(), inputs(3))


def test_preserve_top1_with_top_k_zero() -> None:
    p, x = probs(500), inputs(500)
    harsh = {
        "noise": {"dist": "laplace", "scale": 0.3},
        "preserve_top1": True,
        "top_k": {"k": 2, "mode": "zero"},
        "round": 2,
    }
    r = run(bound(harsh), p, x)
    assert np.array_equal(np.argmax(r.values, 1), np.argmax(p, 1))
    assert np.all((r.values > 0).sum(axis=1) <= 2)


def test_marked_answers_keep_their_label_under_noise_without_preserve_top1() -> None:
    ledger = WatermarkLedger()
    b = bound(
        {"noise": {"dist": "laplace", "scale": 0.3}, "watermark": {"fraction": 0.2}}, ledger=ledger
    )
    r = run(b, probs(500), inputs(500))
    labels = [e.label for e in ledger.entries()]
    assert np.argmax(r.values[r.marked], 1).tolist() == labels


COMBOS: list[dict[str, Any]] = [
    {},
    {"round": 0},
    {"noise": {"scale": 0.5}, "preserve_top1": True, "round": 0},
    {"noise": {"dist": "laplace", "scale": 0.1}, "renormalise": True, "top_k": 1},
    {
        "reverse_sigmoid": {"beta": 1.5, "gamma": 3},
        "preserve_top1": True,
        "top_k": {"k": 3, "mode": "omit"},
    },
    {"noise": {"scale": 0.2}, "label_only": True, "watermark": {"fraction": 0.2}},
    {"watermark": {"fraction": 0.2}, "round": 1, "preserve_top1": True},
]


@pytest.mark.parametrize("mapping", COMBOS)
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_any_valid_profile_gives_well_formed_answers(mapping: dict[str, Any], batch: int) -> None:
    p = probs(batch, seed=batch)
    x = inputs(batch, seed=batch + 1)
    x[0, :3] = [np.nan, np.inf, -1e300]  # hostile inputs still coarsen
    r = run(bound(mapping, ledger=WatermarkLedger()), p, x)
    assert len(r.values) == batch and r.marked.shape == (batch,)
    if r.form == "full":
        assert r.values.shape == (batch, 10)
        assert np.all(np.isfinite(r.values)) and np.all((r.values >= 0) & (r.values <= 1 + 1e-9))
    if mapping.get("preserve_top1"):
        if r.form == "top_k":
            top = r.indices[:, 0]
        else:
            top = r.values if r.form == "label" else np.argmax(r.values, 1)
        keep = ~r.marked  # marked rows carry the watermark label instead
        assert np.array_equal(top[keep], np.argmax(p, 1)[keep])


def test_rounding_matches_numpy_round_bit_for_bit() -> None:
    """The pipeline rounds with multiply/rint/divide; it must equal ndarray.round."""
    rng = np.random.default_rng(4)
    p = rng.dirichlet(np.ones(10), 2000)
    prof = Profile.from_mapping("r", {"round": 3}, output=OutputSpec.probabilities(10))
    r = prof.bind(key=None).apply_at_time(p, inputs=np.zeros((2000, 1)), account="a",
                                          model="m", now=0.0)  # fmt: skip
    assert np.array_equal(r.values, p.round(3))


def test_row_bytes_do_not_depend_on_the_batch() -> None:
    """A row's cell bytes are the same alone or next to a row of huge values."""
    c = Coarsener.from_scale(input_scale=16.0)
    x = np.random.default_rng(5).integers(0, 17, (3, 64)).astype(np.float64)
    big = np.full((1, 64), 1e12)
    together = c.row_bytes(np.vstack([x, big]))
    assert together[:3] == [c.row_bytes(x[i : i + 1])[0] for i in range(3)]
    assert together[3] == c.row_bytes(big)[0] and together[3] != together[0]
    assert len(together[0]) == 4 + 1 + 2 * 64  # narrow cells


@pytest.mark.parametrize("output", ["probabilities", "score"])
def test_a_row_gets_the_same_answer_alone_or_in_a_batch(output: str) -> None:
    """The dynamic batcher mixes requests: a row's answer must not depend on its batch
    (the batch-of-one fast paths give what the batched code gives)."""
    spec = OutputSpec.probabilities(10) if output == "probabilities" else OutputSpec.score()
    prof = Profile.default(spec, coarsen={"input_scale": 16.0})
    b = prof.bind(key=b"k" * 32, ledger=WatermarkLedger())
    rng = np.random.default_rng(6)
    x = rng.integers(0, 17, (300, 64)).astype(np.float64)
    if output == "probabilities":
        p = rng.dirichlet(np.ones(10) * 0.3, 300)
    else:
        p = rng.uniform(0, 1, (300, 1))
    whole = b.apply_at_time(p, inputs=x, account="a", model="m", now=0.0)
    for i in range(300):
        one = b.apply_at_time(p[i : i + 1], inputs=x[i : i + 1], account="a", model="m", now=0.0)
        assert np.array_equal(one.values, whole.values[i : i + 1]), i
        assert one.marked[0] == whole.marked[i]


P10_ = OutputSpec.probabilities(10)


@pytest.mark.parametrize("output", ["probabilities", "score"])
def test_an_empty_batch_gives_an_empty_answer(output: str) -> None:
    spec = OutputSpec.probabilities(10) if output == "probabilities" else OutputSpec.score()
    b = Profile.default(spec, coarsen={"input_scale": 16.0}).bind(
        key=b"k" * 32, ledger=WatermarkLedger()
    )
    shape = (0, 10) if output == "probabilities" else (0, 1)
    r = b.apply_at_time(np.zeros(shape), inputs=np.zeros((0, 64)), account="a", model="m",
                        now=0.0)  # fmt: skip
    assert r.values.shape[0] == 0 and r.marked.shape == (0,)
    top = Profile.from_mapping("t", {"top_k": {"k": 3, "mode": "omit"}}, output=P10_)
    rt = top.bind(key=None).apply_at_time(np.zeros((0, 10)), inputs=np.zeros((0, 64)),
                                          account="a", model="m", now=0.0)  # fmt: skip
    assert rt.form == "top_k" and rt.values.shape == (0, 3) and rt.indices is not None
    lab = Profile.from_mapping("l", {"label_only": True}, output=P10_)
    rl = lab.bind(key=None).apply_at_time(np.zeros((0, 10)), inputs=np.zeros((0, 64)),
                                          account="a", model="m", now=0.0)  # fmt: skip
    assert rl.form == "label" and rl.values.shape == (0,)
