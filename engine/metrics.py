"""Metrics and error bars of probe results (top-k error, balanced accuracy, macro F1, AUROC,
calibration error) with bootstrap intervals and paired layer-vs-layer tests.

Every metric takes N rows and an optional non-negative ``weight``: None -> float, (N,) -> float,
(R, N) -> (R,) float64 array (R weightings at once). A bootstrap resample is a row of
multinomial counts, so R resamples cost one pass of matrix-shaped sums instead of R calls.
Rows or classes of zero total weight make a metric NaN (no error, no warning): a resample
may well miss a class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import InvalidArgumentError

__all__ = ["auroc", "auroc_ovr", "average_precision", "balanced_accuracy", "bootstrap",
           "bootstrap_weights", "expected_calibration_error", "interval", "macro_f1",
           "mean_average_precision", "paired_bootstrap", "softmax", "top_k_error"]

Metric = Callable[..., Any]


def _floats(x: Any, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != ndim or a.shape[0] == 0:
        raise InvalidArgumentError(f"{name} must be a non-empty {ndim}-D array; got shape "
                                   f"{a.shape}")
    if not np.isfinite(a).all():
        raise InvalidArgumentError(f"{name} has NaN or infinite values; drop or fix those rows")
    return a


def _labels(y: Any, n: int, num_classes: int, name: str = "y") -> np.ndarray:
    a = np.asarray(y)
    if a.shape != (n,):
        raise InvalidArgumentError(f"{name} must have shape ({n},) to match the predictions; "
                                   f"got {a.shape}")
    if a.dtype.kind not in "iub":
        raise InvalidArgumentError(f"{name} must hold integer class ids; got dtype {a.dtype}")
    a = a.astype(np.int64)
    if a.min() < 0 or a.max() >= num_classes:
        raise InvalidArgumentError(f"{name} must hold class ids in [0, {num_classes}); got "
                                   f"values from {a.min()} to {a.max()}")
    return a


def _weights(weight: Any, n: int) -> tuple[np.ndarray, bool]:
    """(R, n) float64 weights and whether the caller wants a scalar back."""
    if weight is None:
        return np.ones((1, n)), True
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim not in (1, 2) or w.shape[-1] != n:
        raise InvalidArgumentError(f"weight must have shape ({n},) or (R, {n}) to match the "
                                   f"{n} rows; got {w.shape}")
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        raise InvalidArgumentError(f"weight must be finite and non-negative; {int(bad.sum())} "
                                   "entries are negative, NaN or infinite")
    return np.atleast_2d(w), w.ndim == 1


def _out(values: np.ndarray, single: bool) -> float | np.ndarray:
    return float(values[0]) if single else values


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # NaN where the denominator is zero, without a RuntimeWarning (warnings are errors here)
    return np.divide(num, den, out=np.full(np.shape(num), np.nan), where=den > 0)


def _class_sums(w: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(R, C) sums of w (R, N) over the rows of each class: O(R N) whatever C is."""
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)  # reduceat needs no empties
    out = np.zeros((w.shape[0], num_classes))
    out[:, classes] = np.add.reduceat(w[:, order], starts, axis=1)
    return out


def _present_mean(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    return _ratio(np.where(present, values, 0.0).sum(1), present.sum(1).astype(np.float64))


def softmax(logits: Any) -> np.ndarray:
    """Softmax over the last axis, float64; the max is subtracted first so nothing overflows."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_k_error(logits: Any, y: Any, k: int = 1, weight: Any = None) -> float | np.ndarray:
    """Weighted share of rows whose class is not among the k largest of logits (N, C).

    Ties go to the row: a row is a hit when strictly fewer than k classes have a larger logit
    than its true class (as in the solver's kernels)."""
    z = _floats(logits, "logits", 2)
    yy = _labels(y, z.shape[0], z.shape[1])
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidArgumentError(f"k must be an integer >= 1; got {k!r}")
    w, single = _weights(weight, z.shape[0])
    above = (z > z[np.arange(len(yy)), yy][:, None]).sum(1)
    return _out(1.0 - _ratio(w @ (above < k).astype(np.float64), w.sum(1)), single)


def _confusion(pred: Any, y: Any, num_classes: int,
               weight: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """(R, C) weights of the true positives, of each true class, of each predicted class."""
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise InvalidArgumentError(f"num_classes must be an integer >= 1; got {num_classes!r}")
    p = np.asarray(pred)
    if p.ndim != 1 or p.shape[0] == 0:
        raise InvalidArgumentError(f"pred must be a non-empty 1-D array of class ids; got "
                                   f"shape {p.shape} (take logits.argmax(1))")
    p = _labels(p, len(p), num_classes, "pred")
    yy = _labels(y, len(p), num_classes)
    w, single = _weights(weight, len(p))
    tp = _class_sums(w * (p == yy), yy, num_classes)
    return tp, _class_sums(w, yy, num_classes), _class_sums(w, p, num_classes), single


def balanced_accuracy(pred: Any, y: Any, num_classes: int,
                      weight: Any = None) -> float | np.ndarray:
    """Mean recall over the classes of y with positive weight; pred, y (N,) class ids.

    Equals ``sklearn.metrics.balanced_accuracy_score(y, pred, sample_weight=weight)``."""
    tp, true, _, single = _confusion(pred, y, num_classes, weight)
    return _out(_present_mean(_ratio(tp, true), true > 0), single)


def macro_f1(pred: Any, y: Any, num_classes: int, weight: Any = None) -> float | np.ndarray:
    """Mean F1 over the classes in y or pred among rows of positive weight (F1 = 0 for a class
    never hit); pred, y (N,) class ids.

    Equals ``sklearn.metrics.f1_score(y, pred, average="macro", zero_division=0)`` on the rows of
    positive weight with ``sample_weight=weight``. (Given zero weights, sklearn also averages
    in classes seen only in zero-weight rows, at F1 = 0: that would drag every bootstrap
    resample down, so they are left out here, as in a resample that drops those rows.)"""
    tp, true, predicted, single = _confusion(pred, y, num_classes, weight)
    present = (true + predicted) > 0
    return _out(_present_mean(_ratio(2 * tp, true + predicted), present), single)


def _auroc(w: np.ndarray, score: np.ndarray, pos: np.ndarray) -> np.ndarray:
    # Weighted Mann-Whitney: sort once, sum weights per group of tied scores; a positive beats
    # the negatives strictly below its group and half of those tied with it.
    order = np.argsort(score, kind="stable")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    wo, po = w[:, order], pos[order]
    gp = np.add.reduceat(wo * po, starts, axis=1)  # (R, groups)
    gn = np.add.reduceat(wo * ~po, starts, axis=1)
    below = np.cumsum(gn, axis=1) - gn
    num = (gp * (below + 0.5 * gn)).sum(1)
    return _ratio(num, gp.sum(1) * gn.sum(1))


def auroc(score: Any, y: Any, weight: Any = None) -> float | np.ndarray:
    """Area under the ROC curve of score (N,) (e.g. a logit difference) for y (N,) in {0, 1};
    ties count 1/2. NaN when either class has zero weight.

    Equals ``sklearn.metrics.roc_auc_score(y, score, sample_weight=weight)``."""
    s = _floats(score, "score", 1)
    yy = _labels(y, len(s), 2)
    w, single = _weights(weight, len(s))
    return _out(_auroc(w, s, yy == 1), single)


def auroc_ovr(logits: Any, y: Any, weight: Any = None) -> float | np.ndarray:
    """Macro one-vs-rest AUROC of softmax(logits (N, C)) over classes with weight on both sides.

    Ranks by the softmax probability (not the logit: the two orders differ), so with every
    class present it equals ``roc_auc_score(y, softmax(logits), multi_class="ovr")``."""
    probs = softmax(_floats(logits, "logits", 2))
    yy = _labels(y, probs.shape[0], probs.shape[1])
    w, single = _weights(weight, len(yy))
    per_class = np.stack([_auroc(w, probs[:, c], yy == c) for c in range(probs.shape[1])], 1)
    return _out(_present_mean(np.nan_to_num(per_class), ~np.isnan(per_class)), single)


def expected_calibration_error(probs: Any, y: Any, bins: int = 15,
                               weight: Any = None) -> float | np.ndarray:
    """Top-label ECE of probs (N, C): sum over bins of (W_b / W) |accuracy_b - confidence_b|.

    Confidence = max prob, prediction = argmax; equal-width bins with edges
    ``np.linspace(0, 1, bins + 1)``, bin i = (edge_i, edge_i+1], a confidence of 0 in bin 0."""
    p = _floats(probs, "probs", 2)
    yy = _labels(y, p.shape[0], p.shape[1])
    if not isinstance(bins, (int, np.integer)) or bins < 1:
        raise InvalidArgumentError(f"bins must be an integer >= 1; got {bins!r}")
    w, single = _weights(weight, len(yy))
    conf = p.max(1)
    b = np.clip(np.searchsorted(np.linspace(0, 1, bins + 1), conf, side="left") - 1, 0, bins - 1)
    # (W_b / W) |A_b / W_b - C_b / W_b| = |A_b - C_b| / W: empty bins need no special case
    gap = _class_sums(w * (p.argmax(1) == yy), b, bins) - _class_sums(w * conf, b, bins)
    return _out(_ratio(np.abs(gap).sum(1), w.sum(1)), single)


def bootstrap_weights(n: int, resamples: int = 1000, seed: int = 0,
                      groups: Any = None) -> np.ndarray:
    """(resamples, n) float64 count weights: n rows drawn with replacement, or with ``groups``
    (n,) ids, as many groups drawn with replacement, each row getting its group's count (the
    token rows of one item move together). Deterministic for a seed (PCG64)."""
    for name, v in (("n", n), ("resamples", resamples)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise InvalidArgumentError(f"{name} must be an integer >= 1; got {v!r}")
    rng = np.random.Generator(np.random.PCG64(seed))
    inverse, m = None, n
    if groups is not None:
        g = np.asarray(groups)
        if g.shape != (n,):
            raise InvalidArgumentError(f"groups must have shape ({n},), one id per row; got "
                                       f"{g.shape}")
        _, inverse = np.unique(g, return_inverse=True)
        m = int(inverse.max()) + 1
    # counts of m draws over m units, every resample at once via one bincount
    draws = rng.integers(0, m, size=(resamples, m)) + m * np.arange(resamples)[:, None]
    counts = np.bincount(draws.ravel(), minlength=resamples * m).reshape(resamples, m)
    return (counts if inverse is None else counts[:, inverse]).astype(np.float64)


def interval(values: Any, level: float = 0.95) -> tuple[float, float]:
    """Central percentile interval (low, high) of (R,) values, NaN ignored."""
    if not 0 < level < 1:
        raise InvalidArgumentError(f"level must be in (0, 1); got {level!r}")
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(v, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def _std(values: np.ndarray) -> float:
    v = values[~np.isnan(values)]
    return float(v.std(ddof=1)) if v.size > 1 else float("nan")


def _resampled(n: int, resamples: int, seed: int, groups: Any, base: Any) -> np.ndarray:
    # a caller's own (N,) weights scale the counts of every resample
    w = bootstrap_weights(n, resamples, seed, groups)
    return w if base is None else w * _weights(base, n)[0]


def bootstrap(metric: Metric, *args: Any, resamples: int = 1000, seed: int = 0,
              groups: Any = None, level: float = 0.95, **kwargs: Any) -> dict[str, float]:
    """``metric(*args, **kwargs)`` with a bootstrap interval: {"value", "low", "high", "std"}.

    The rows are those of the first positional argument (every metric here takes its N-row
    predictions first); a ``weight=`` (N,) in kwargs multiplies the resample counts."""
    base = kwargs.pop("weight", None)
    value = metric(*args, weight=base, **kwargs)
    w = _resampled(len(args[0]), resamples, seed, groups, base)
    values = np.asarray(metric(*args, weight=w, **kwargs))
    low, high = interval(values, level)
    return {"value": float(value), "low": low, "high": high, "std": _std(values)}


def paired_bootstrap(metric: Metric, a_args: tuple, b_args: tuple, resamples: int = 1000,
                     seed: int = 0, groups: Any = None, level: float = 0.95,
                     **kwargs: Any) -> dict[str, float]:
    """metric(*b_args) - metric(*a_args) on the same rows (e.g. two layers' predictions) with
    the same resamples for both: {"difference", "low", "high", "p"}.

    p = min(1, 2 min(P(diff <= 0), P(diff >= 0))) over resamples, two-sided; its resolution is
    1 / resamples, so p == 0 means p < 1 / resamples. kwargs (e.g. ``k=5``, a ``weight=`` (N,)
    that scales the resample counts) go to both calls."""
    n = len(a_args[0])
    if len(b_args[0]) != n:
        raise InvalidArgumentError(f"a_args and b_args must cover the same rows; got {n} and "
                                   f"{len(b_args[0])} rows")
    base = kwargs.pop("weight", None)
    difference = metric(*b_args, weight=base, **kwargs) - metric(*a_args, weight=base, **kwargs)
    w = _resampled(n, resamples, seed, groups, base)
    diff = np.asarray(metric(*b_args, weight=w, **kwargs) - metric(*a_args, weight=w, **kwargs))
    diff = diff[~np.isnan(diff)]
    p = min(1.0, 2 * min((diff <= 0).mean(), (diff >= 0).mean())) if diff.size else float("nan")
    low, high = interval(diff, level)
    return {"difference": float(difference), "low": low, "high": high, "p": float(p)}


def average_precision(score: Any, y: Any) -> float:
    """Average precision of one class: scores (N,), y (N,) of 0 / 1; the precision at each
    distinct score threshold weighted by the recall it adds (scikit-learn's
    ``average_precision_score``: tied scores form one threshold). NaN without a positive."""
    s = _floats(score, "score", 1)
    t = np.asarray(y)
    if t.shape != s.shape:
        raise InvalidArgumentError(f"y must have shape {s.shape}, like score; got {t.shape}")
    positives = float((t > 0).sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, t = s[order], (t[order] > 0).astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the end of each tie group
    tp = np.cumsum(t)[last]
    precision = tp / (last + 1)
    recall_gain = np.diff(np.r_[0.0, tp]) / positives
    return float((precision * recall_gain).sum())


def mean_average_precision(scores: Any, y: Any) -> float:
    """mAP of a multi-label probe (VOC's figure): the mean over classes with a positive of
    :func:`average_precision`; scores and y (N, C)."""
    s = _floats(scores, "scores", 2)
    t = np.asarray(y)
    if t.shape != s.shape:
        raise InvalidArgumentError(f"y must have shape {s.shape}, like scores; got {t.shape}")
    ap = [average_precision(s[:, c], t[:, c]) for c in range(s.shape[1]) if (t[:, c] > 0).any()]
    return float(np.mean(ap)) if ap else float("nan")
