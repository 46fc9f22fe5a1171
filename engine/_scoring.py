"""Scores of the chosen probes beyond loss and error, from their per-row outputs
(:meth:`engine.objective.ProbeObjective.row_outputs`, saved with each probe): balanced
accuracy, macro F1, calibration error, AUROC of binary probes, and bootstrap intervals of
the errors, every layer resampled with the same rows (a paired bootstrap), so that the
difference between two layers has an interval of its own (:func:`significance`)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from . import metrics

__all__ = ["BINS", "LEVEL", "RESAMPLES", "Resampled", "calibration_error", "score",
           "significance"]

#: bootstrap resamples, interval level, calibration bins
RESAMPLES, LEVEL, BINS = 1000, 0.95, 15
#: resample weights drawn at once (entries): about 2 MB of float64, so that scoring stays
#: small beside a solve's memory budget (a few such arrays live while they are drawn)
CHUNK = 1 << 18


def calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS
                      ) -> float:
    """Top-label ECE from each row's top-class probability and whether that class was right:
    :func:`engine.metrics.expected_calibration_error`'s binning, without the (N, C)
    probabilities."""
    edges = np.linspace(0, 1, bins + 1)
    b = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    gap = (np.bincount(b, correct.astype(np.float64), bins)
           - np.bincount(b, confidence.astype(np.float64), bins))
    return float(np.abs(gap).sum() / len(confidence))


#: split -> (R, L) resampled top-1 errors of L layers, their names, and (L,) the errors on
#: all rows
Resampled = dict[str, tuple[np.ndarray, list[str], np.ndarray]]


def score(outputs: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
          labels: Mapping[str, np.ndarray], num_classes: int,
          groups: Mapping[str, np.ndarray] | None = None, *, resamples: int = RESAMPLES,
          seed: int = 0, level: float = LEVEL
          ) -> tuple[dict[tuple[str, str], dict[str, float]], Resampled]:
    """Per (layer, split) of ``outputs`` (layer -> split -> per-row arrays): the extra
    columns of the results table, and per split the resampled top-1 errors of every layer.
    ``groups`` (split -> (N,) item ids) resamples a token store's rows by item."""
    cols: dict[tuple[str, str], dict[str, float]] = {}
    resampled: Resampled = {}
    splits = {s for per in outputs.values() for s in per if s in labels}
    for split in sorted(splits):
        # the rows the outputs cover: a partial store's committed rows may have grown since
        n = min(len(per[split]["pred"]) for per in outputs.values() if split in per)
        y = np.asarray(labels[split])[:n]
        layers = [layer for layer, per in outputs.items()
                  if split in per and len(per[split]["pred"]) == n]
        multi = y.ndim == 2  # multi-label: wrong when the top class is not a positive
        wrong = np.stack([(y[np.arange(n), outputs[layer][split]["pred"]] == 0) if multi
                          else outputs[layer][split]["pred"] != y for layer in layers], 1)
        hit5 = [outputs[layer][split].get("hit5") for layer in layers]
        errors, errors5 = [], []
        step = max(1, CHUNK // len(y))
        for first in range(0, resamples, step):  # the same resamples for every layer
            w = metrics.bootstrap_weights(len(y), min(step, resamples - first), seed + first,
                                          None if groups is None else groups.get(split))
            total = w.sum(1, keepdims=True)
            errors.append(w @ wrong / total)
            if all(h is not None for h in hit5):
                errors5.append(w @ (~np.stack(hit5, 1)) / total)
        err = np.concatenate(errors)
        err5 = np.concatenate(errors5) if errors5 else None
        resampled[split] = (err, layers, wrong.mean(0))
        for j, layer in enumerate(layers):
            o = outputs[layer][split]
            low, high = metrics.interval(err[:, j], level)
            c = {"top1_error_low": low, "top1_error_high": high}
            if err5 is not None:
                c["top5_error_low"], c["top5_error_high"] = metrics.interval(err5[:, j], level)
            if multi:
                c["mAP"] = metrics.mean_average_precision(o["scores"], y)
                cols[(layer, split)] = c
                continue
            pred = np.asarray(o["pred"], dtype=np.int64)
            c["balanced_accuracy"] = metrics.balanced_accuracy(pred, y, num_classes)
            c["macro_f1"] = metrics.macro_f1(pred, y, num_classes)
            c["ece"] = calibration_error(o["confidence"], pred == y)
            if num_classes == 2:
                c["auroc"] = metrics.auroc(o["score"], y)
            cols[(layer, split)] = c
    return cols, resampled


def significance(resampled: Resampled, split: str, order: list[str], *,
                 level: float = LEVEL) -> pd.DataFrame:
    """Each layer of ``order`` against the next: ``difference`` (the next one's top-1 error
    minus this one's), its paired-bootstrap interval ``low`` / ``high``, and ``p``, the
    two-sided bootstrap p-value (resolution 1 / resamples)."""
    err, layers, observed = resampled[split]
    at = {layer: j for j, layer in enumerate(layers)}
    seq = [layer for layer in order if layer in at]
    rows = []
    for a, b in zip(seq, seq[1:], strict=False):
        diff = err[:, at[b]] - err[:, at[a]]
        diff = diff[~np.isnan(diff)]
        low, high = metrics.interval(diff, level)
        p = min(1.0, 2 * min((diff <= 0).mean(), (diff >= 0).mean()))
        rows.append({"layer": a, "next": b,
                     "difference": float(observed[at[b]] - observed[at[a]]),
                     "low": low, "high": high, "p": float(p)})
    return pd.DataFrame(rows, columns=["layer", "next", "difference", "low", "high", "p"])
