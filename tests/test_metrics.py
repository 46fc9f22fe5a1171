"""engine.metrics: each metric against scikit-learn (or a plain loop), with and without sample
weights; (R, N) weights against R separate calls; bootstrap weights, intervals and the paired
test on samples whose answer is known."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from engine.errors import InvalidArgumentError
from engine.metrics import (
    auroc,
    auroc_ovr,
    balanced_accuracy,
    bootstrap,
    bootstrap_weights,
    expected_calibration_error,
    interval,
    macro_f1,
    paired_bootstrap,
    softmax,
    top_k_error,
)

N, C = 60, 5
SEEDS = [0, 1, 2]


def _sk(fn, *args, **kwargs):
    # sklearn warns where a class has no weight ("y_pred contains classes not in y_true", ...);
    # the value is what is compared, and warnings are errors in this project
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _data(seed: int, n: int = N, c: int = C):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y]  # better than chance, not perfect
    pred = logits.argmax(1)
    w = rng.integers(0, 4, n).astype(np.float64)  # zeros included: some classes may vanish
    return rng, logits, y, pred, w


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_error_matches_sklearn(seed, k):
    _, logits, y, _, w = _data(seed)
    for weight in (None, w):
        want = 1 - skm.top_k_accuracy_score(y, logits, k=k, labels=np.arange(C),
                                            sample_weight=weight)
        got = top_k_error(logits, y, k=k, weight=weight)
        assert isinstance(got, float)
        assert got == pytest.approx(want, abs=1e-12)


def test_top_k_error_ties_go_to_the_row():
    logits = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [2.0, 1.0, 1.0]])
    # row 0: class 1 tied for first -> top-1 hit; row 1: class 2 has 2 above -> top-2 miss;
    # row 2: class 2 tied with class 1, one above -> top-2 hit, top-1 miss
    assert top_k_error(logits[:1], [1], k=1) == 0.0
    assert top_k_error(logits[1:2], [2], k=2) == 1.0
    assert top_k_error(logits[2:], [2], k=2) == 0.0
    assert top_k_error(logits[2:], [2], k=1) == 1.0


@pytest.mark.parametrize("seed", SEEDS)
def test_balanced_accuracy_matches_sklearn(seed):
    _, _, y, pred, w = _data(seed)
    w[y == 0] = 0  # a class with no weight is left out, as sklearn leaves it out
    for weight in (None, w):
        want = _sk(skm.balanced_accuracy_score, y, pred, sample_weight=weight)
        assert balanced_accuracy(pred, y, C, weight=weight) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_macro_f1_matches_sklearn_on_rows_of_positive_weight(seed):
    _, _, y, pred, w = _data(seed)
    pred[:3] = C  # a predicted class that y never has counts (with F1 = 0)
    want = skm.f1_score(y, pred, average="macro", zero_division=0)
    assert macro_f1(pred, y, C + 1) == pytest.approx(want, abs=1e-12)
    w[y == 1] = 0
    keep = w > 0
    want = skm.f1_score(y[keep], pred[keep], average="macro", sample_weight=w[keep],
                        zero_division=0)
    assert macro_f1(pred, y, C + 1, weight=w) == pytest.approx(want, abs=1e-12)
    # with positive weights throughout, sklearn on all rows is the same thing
    w1 = w + 1
    want = skm.f1_score(y, pred, average="macro", sample_weight=w1, zero_division=0)
    assert macro_f1(pred, y, C + 1, weight=w1) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
def test_auroc_matches_sklearn(seed, ties):
    rng, logits, y, _, w = _data(seed, c=2)
    score = logits[:, 1] - logits[:, 0]
    if ties:
        score = np.round(score)  # few distinct values: ties count 1/2
    w[:2], y[:2] = 1, [0, 1]  # both classes keep some weight
    for weight in (None, w, rng.random(N)):
        want = skm.roc_auc_score(y, score, sample_weight=weight)
        assert auroc(score, y, weight=weight) == pytest.approx(want, abs=1e-12)


def test_auroc_is_nan_without_one_class():
    y = np.array([0, 1, 0, 1])
    assert np.isnan(auroc([0.1, 0.2, 0.3, 0.4], y, weight=[1, 0, 2, 0]))
    assert auroc([0.1, 0.2, 0.3, 0.4], y) == 0.75


@pytest.mark.parametrize("seed", SEEDS)
def test_auroc_ovr_matches_sklearn(seed):
    _, logits, y, _, w = _data(seed)
    y[:C] = np.arange(C)  # every class present
    w[:C] = 1
    for weight in (None, w):
        want = skm.roc_auc_score(y, softmax(logits), multi_class="ovr", average="macro",
                                 sample_weight=weight)
        assert auroc_ovr(logits, y, weight=weight) == pytest.approx(want, abs=1e-12)


def _ece_loop(probs, y, bins, w):
    conf, correct = probs.max(1), probs.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for i in range(bins):
        inside = (conf > edges[i]) & (conf <= edges[i + 1])
        if i == 0:
            inside |= conf == 0
        wb = w[inside].sum()
        if wb > 0:
            acc = (w[inside] * correct[inside]).sum() / wb
            mean_conf = (w[inside] * conf[inside]).sum() / wb
            total += wb / w.sum() * abs(acc - mean_conf)
    return total


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bins", [1, 5, 15])
def test_expected_calibration_error_matches_a_loop(seed, bins):
    _, logits, y, _, w = _data(seed)
    probs = softmax(logits)
    probs[0] = np.eye(C)[0]  # a confidence of exactly 1 sits in the last bin
    assert expected_calibration_error(probs, y, bins) == pytest.approx(
        _ece_loop(probs, y, bins, np.ones(N)), abs=1e-12)
    got = expected_calibration_error(probs, y, bins, weight=w)
    assert got == pytest.approx(_ece_loop(probs, y, bins, w), abs=1e-12)
    assert got > 0


def test_expected_calibration_error_puts_an_edge_in_the_lower_bin():
    # bins (0, .25], (.25, .5], (.5, .75], (.75, 1]: 0.5 sits in bin 1, 0.6 in bin 2, so the
    # two rows are alone in their bins; in one bin they would give |0.5 - 0.55| = 0.05
    probs, y = np.array([[0.5, 0.5], [0.6, 0.4]]), np.array([0, 1])
    assert expected_calibration_error(probs, y, bins=4) == pytest.approx(0.55, abs=1e-12)
    assert _ece_loop(probs, y, 4, np.ones(2)) == pytest.approx(0.55, abs=1e-12)


def test_softmax_is_stable_and_float64():
    z = np.array([[1000.0, 1000.0, 0.0], [1.0, 2.0, 3.0]], dtype=np.float32)
    p = softmax(z)
    assert p.dtype == np.float64
    np.testing.assert_allclose(p[0], [0.5, 0.5, 0.0], atol=1e-300)
    e = np.exp([1.0, 2.0, 3.0])
    np.testing.assert_allclose(p[1], e / e.sum(), rtol=1e-14)


METRICS = {
    "top1": lambda lg, y, p, w: top_k_error(lg, y, weight=w),
    "top3": lambda lg, y, p, w: top_k_error(lg, y, k=3, weight=w),
    "balanced": lambda lg, y, p, w: balanced_accuracy(p, y, C, weight=w),
    "f1": lambda lg, y, p, w: macro_f1(p, y, C, weight=w),
    "auroc": lambda lg, y, p, w: auroc(lg[:, 1] - lg[:, 0], y % 2, weight=w),
    "ovr": lambda lg, y, p, w: auroc_ovr(lg, y, weight=w),
    "ece": lambda lg, y, p, w: expected_calibration_error(softmax(lg), y, weight=w),
}


@pytest.mark.parametrize("name", sorted(METRICS))
def test_a_weight_matrix_equals_one_call_per_row(name):
    _, logits, y, pred, _ = _data(3)
    weights = bootstrap_weights(N, resamples=7, seed=1)
    weights[0] = 0  # a row of zeros: NaN, no warning
    weights[1, y == 2] = 0  # a class that is absent from one resample
    got = METRICS[name](logits, y, pred, weights)
    assert isinstance(got, np.ndarray) and got.shape == (7,) and got.dtype == np.float64
    want = [METRICS[name](logits, y, pred, w) for w in weights]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert np.isnan(got[0]) and not np.isnan(got[1:]).any()


def test_bootstrap_weights_are_counts():
    w = bootstrap_weights(50, resamples=200, seed=3)
    assert w.shape == (200, 50) and w.dtype == np.float64
    np.testing.assert_array_equal(w.sum(1), 50)
    np.testing.assert_array_equal(w, np.round(w))
    assert (w == 0).mean() == pytest.approx((1 - 1 / 50) ** 50, abs=0.02)  # ~36.4% left out
    np.testing.assert_array_equal(w, bootstrap_weights(50, resamples=200, seed=3))
    assert not np.array_equal(w, bootstrap_weights(50, resamples=200, seed=4))


def test_bootstrap_weights_move_a_group_together():
    groups = np.repeat([7, 3, 9, 1], [5, 1, 3, 2])[np.random.default_rng(0).permutation(11)]
    w = bootstrap_weights(11, resamples=100, seed=0, groups=groups)
    for g in np.unique(groups):
        rows = w[:, groups == g]
        np.testing.assert_array_equal(rows, rows[:, :1].repeat(rows.shape[1], 1))
    # 4 groups drawn 4 times: the group counts sum to 4
    first = [np.flatnonzero(groups == g)[0] for g in np.unique(groups)]
    np.testing.assert_array_equal(w[:, first].sum(1), 4)


def _bernoulli_logits(errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) logits and labels 0 whose top-1 error row by row is ``errors``."""
    logits = np.zeros((len(errors), 2))
    logits[:, 1] = np.where(errors, 1.0, -1.0)
    return logits, np.zeros(len(errors), dtype=np.int64)


def test_bootstrap_interval_of_a_bernoulli_error_rate():
    n, rate = 2000, 0.3
    errors = np.random.default_rng(5).random(n) < rate
    logits, y = _bernoulli_logits(errors)
    out = bootstrap(top_k_error, logits, y, resamples=1000, seed=0)
    assert out["value"] == pytest.approx(errors.mean(), abs=1e-12)
    assert out["low"] < rate < out["high"] and out["low"] < out["value"] < out["high"]
    se = np.sqrt(rate * (1 - rate) / n)
    assert out["std"] == pytest.approx(se, rel=0.15)
    assert out["high"] - out["low"] == pytest.approx(2 * 1.96 * se, rel=0.2)


def test_grouped_bootstrap_is_wider_when_a_group_shares_one_outcome():
    per_group = 10
    outcome = np.random.default_rng(1).random(60) < 0.4
    groups = np.repeat(np.arange(60), per_group)
    logits, y = _bernoulli_logits(outcome[groups])
    rows = bootstrap(top_k_error, logits, y, resamples=500)
    grouped = bootstrap(top_k_error, logits, y, resamples=500, groups=groups)
    assert grouped["value"] == rows["value"]
    # perfectly correlated rows: the honest width is sqrt(10) ~ 3.2 times the row width
    assert grouped["high"] - grouped["low"] > 2 * (rows["high"] - rows["low"])


def test_paired_bootstrap_of_identical_predictions():
    _, logits, y, _, _ = _data(0)
    out = paired_bootstrap(top_k_error, (logits, y), (logits.copy(), y), resamples=200)
    assert out == {"difference": 0.0, "low": 0.0, "high": 0.0, "p": 1.0}


def test_paired_bootstrap_finds_a_clear_improvement():
    rng = np.random.default_rng(2)
    n = 500
    a_wrong = rng.random(n) < 0.4
    b_wrong = a_wrong & (rng.random(n) < 0.25)  # b fixes most of a's mistakes
    y = np.zeros(n, dtype=np.int64)
    a, b = _bernoulli_logits(a_wrong)[0], _bernoulli_logits(b_wrong)[0]
    out = paired_bootstrap(top_k_error, (b, y), (a, y), resamples=500)  # a - b: a rise
    assert out["difference"] == pytest.approx(a_wrong.mean() - b_wrong.mean())
    assert out["p"] < 0.01 and 0 < out["low"] < out["difference"] < out["high"]
    # the same data, no real difference: two layers that err on different, equally many rows
    c_wrong = np.roll(a_wrong, 1)
    out = paired_bootstrap(top_k_error, (a, y), (_bernoulli_logits(c_wrong)[0], y),
                           resamples=500)
    assert out["p"] > 0.2 and out["low"] < 0 < out["high"]


def test_interval_ignores_nan():
    v = np.r_[np.arange(101.0), np.nan, np.nan]
    assert interval(v, 0.9) == pytest.approx((5.0, 95.0), abs=1e-9)
    lo, hi = interval([np.nan, np.nan])
    assert np.isnan(lo) and np.isnan(hi)


@pytest.mark.parametrize(("call", "match"), [
    (lambda: top_k_error(np.zeros((4, 3)), [0, 1, 2]), r"y must have shape \(4,\).*\(3,\)"),
    (lambda: top_k_error(np.zeros((4, 3)), [0, 1, 2, 3]), r"y must hold class ids in \[0, 3\)"),
    (lambda: top_k_error(np.zeros((4, 3)), [0, 1, 2, -1]), r"\[0, 3\).*-1"),
    (lambda: top_k_error(np.zeros((4, 3)), [0.0, 1, 2, 0]), "integer class ids"),
    (lambda: top_k_error(np.zeros((4, 3)), [0, 1, 2, 0], k=0), "k must be"),
    (lambda: top_k_error(np.zeros(4), [0, 1, 2, 0]), r"logits must be .*2-D.*\(4,\)"),
    (lambda: top_k_error(np.full((1, 2), np.nan), [0]), "NaN"),
    (lambda: top_k_error(np.zeros((2, 3)), [0, 1], weight=[1, -1]), "non-negative"),
    (lambda: top_k_error(np.zeros((2, 3)), [0, 1], weight=[1, 1, 1]),
     r"weight must have shape \(2,\) or \(R, 2\).*\(3,\)"),
    (lambda: top_k_error(np.zeros((2, 3)), [0, 1], weight=np.ones((2, 2, 2))), "weight"),
    (lambda: balanced_accuracy([0, 5], [0, 1], 3), r"pred must hold class ids in \[0, 3\)"),
    (lambda: macro_f1([0, 1], [0, 1, 1], 3), r"y must have shape \(2,\)"),
    (lambda: macro_f1([0, 1], [0, 1], 0), "num_classes"),
    (lambda: auroc([0.1, 0.2], [0, 2]), r"\[0, 2\)"),
    (lambda: expected_calibration_error(np.eye(2), [0, 1], bins=0), "bins"),
    (lambda: bootstrap_weights(0), "n must be"),
    (lambda: bootstrap_weights(3, groups=[0, 1]), r"groups must have shape \(3,\)"),
    (lambda: interval([1.0], level=1.5), "level"),
    (lambda: paired_bootstrap(top_k_error, (np.eye(2), [0, 1]), (np.eye(3), [0, 1, 2])),
     "same rows"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(InvalidArgumentError, match=match):
        call()
