"""Probe results: the table people read and the weights pipelines use. Their home in a store
is ``probes/<run>/<layer>/{W,b}`` (:mod:`engine.format`; :func:`engine.load_results` reads
them back)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import _scoring
from .errors import SplitNotFoundError

__all__ = ["ProbeResults", "COLUMNS"]

COLUMNS = ["layer", "split", "site", "dim", "reduction", "l2", "iterations", "converged",
           "loss", "top1_error", "top5_error", "seconds"]
#: a layer's MDL figures (``solve(mdl=True)``), the same on each of its rows: the online
#: codelength and the uniform one in bits, and the compression (uniform / online)
MDL_COLUMNS = ["codelength", "uniform_codelength", "compression"]


@dataclass
class ProbeResults:
    """What ``engine.solve`` found.

    ``table``: one row per (layer, split) for the chosen lambda of each layer, columns
    :data:`COLUMNS`. ``grid``: every lambda tried, one row per (layer, l2). ``weights``:
    layer -> (W (D, C) float32, b (C,) float32). ``backends``: layer -> the device, the
    loss / gradient kernel and the matmul precision it was solved with, and where its
    features were (resident, streamed, or row shards on Dask workers).

    Where the per-row outputs of the chosen probes are known (a solve, or a store's run
    saved by this version), the valid / test rows also have ``top1_error_low`` /
    ``top1_error_high`` (95% bootstrap interval; top-5 likewise for C > 5),
    ``balanced_accuracy``, ``macro_f1``, ``ece`` (top-label expected calibration error, 15
    bins) and, for two classes, ``auroc``; :meth:`significance` compares adjacent layers.
    ``solve(controls=, mdl=)`` add their columns (``engine.solve``).
    """

    table: pd.DataFrame
    grid: pd.DataFrame
    weights: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False)
    config: dict = field(default_factory=dict)
    run: str | None = None
    path: str | None = None
    #: layer -> how it was solved: {"device", "kernel" ("cuda" fused or "torch"), "matmul",
    #: "features" ("resident", "streamed" from the store every pass, or "rows over N shards")}
    backends: dict[str, dict] = field(default_factory=dict)
    #: split -> the bootstrap's resampled top-1 errors of the layers (engine._scoring)
    resampled: _scoring.Resampled = field(default_factory=dict, repr=False)

    @classmethod
    def from_records(cls, records: dict[str, dict], info: dict[str, dict], *, config: dict,
                     run: str | None, path: str | None,
                     labels: Mapping[str, np.ndarray] | None = None,
                     groups: Mapping[str, np.ndarray] | None = None) -> ProbeResults:
        """The results of per-layer ``records`` (engine._fit.select); with ``labels``
        (split -> (N,)) and per-row outputs in the records, the scores of
        :mod:`engine._scoring` (``groups``: split -> item of each row, for token stores)."""
        rows, grid, weights, backends = [], [], {}, {}
        extra: dict[str, None] = {}  # columns beyond COLUMNS, in the order first met
        outputs = {layer: rec["outputs"] for layer, rec in records.items()
                   if rec.get("outputs")}
        scores, resampled = ({}, {}) if not (outputs and labels) else _scoring.score(
            outputs, labels, int(config["num_classes"]), groups)
        for layer, rec in records.items():
            backends[layer] = dict(rec.get("backend", {}))
            meta = info.get(layer, {})
            mdl = {k: rec["mdl"][k] for k in MDL_COLUMNS} if rec.get("mdl") else {}
            for split, m in rec["metrics"].items():
                more = {k: v for k, v in m.items() if k not in COLUMNS}
                row = {"layer": layer, "split": split, "site": meta.get("site", ""),
                       "dim": meta.get("dim", int(rec["W"].shape[0])),
                       "reduction": meta.get("reduction", ""), "l2": rec["l2"],
                       # a split's row is its probe's: the refit's on test, else the chosen
                       "iterations": m.get("iterations", rec["iterations"]),
                       "converged": m.get("converged", rec["converged"]),
                       "loss": m["loss"], "top1_error": m["top1_error"],
                       "top5_error": m["top5_error"], "seconds": rec.get("seconds"),
                       **more, **mdl, **scores.get((layer, split), {})}
                extra.update(dict.fromkeys([*more, *mdl, *scores.get((layer, split), {})]))
                rows.append(row)
            grid += [{"layer": layer, **g} for g in rec["grid"]]
            weights[layer] = (rec["W"], rec["b"])
        return cls(pd.DataFrame(rows, columns=COLUMNS + list(extra)), pd.DataFrame(grid),
                   weights, config, run, path, backends, resampled)

    def significance(self, split: str = "test") -> pd.DataFrame:
        """Each layer against the next (in table order) on ``split``: ``difference`` of
        top-1 error (next minus this), its 95% paired-bootstrap interval ``low`` / ``high``
        (both layers scored on the same resampled rows) and the two-sided bootstrap ``p``
        (resolution 1/1000): a rise or a bump is significant when the interval excludes 0."""
        if split not in self.resampled:
            raise SplitNotFoundError(
                f"no per-row outputs for split {split!r} (have: {sorted(self.resampled)}); "
                f"they exist for valid / test of runs solved by this version: solve again "
                f"with another run name to get them")
        order = list(dict.fromkeys(self.table.layer))
        return _scoring.significance(self.resampled, split, order)

    def error(self, split: str = "test", metric: str = "top1_error") -> pd.Series:
        """``metric`` per layer on ``split``, in layer order."""
        t = self.table[self.table.split == split]
        return pd.Series(t[metric].to_numpy(), index=t.layer.to_numpy(), name=metric)

    def logits(self, layer: str, features: np.ndarray) -> np.ndarray:
        """(N, C) logits of ``layer``'s probe on (N, D) features."""
        w, b = self.weights[layer]
        return np.asarray(features, dtype=np.float32) @ w + b

    def __str__(self) -> str:
        t = self.table.copy()
        for col in ("loss", "top1_error", "top5_error",
                    *(c for c in t.columns if c not in COLUMNS and t[c].dtype.kind == "f")):
            t[col] = t[col].map(lambda v: "" if v is None or math.isnan(v) else f"{v:.4f}")
        return t.drop(columns=["seconds"]).to_string(index=False)

    # -- export (engine/_export.py; imported on use, so that reading results needs neither
    # safetensors nor pyarrow) --------------------------------------------------------------
    def save_weights(self, path: str | os.PathLike, format: str | None = None) -> None:
        """Write every layer's probe, W (D, C) and b (C,) float32, as tensors
        ``<layer>/W`` and ``<layer>/b``, with the run's name, store, config and each layer's
        l2 as JSON metadata. ``format``: ``"safetensors"`` (the ``safetensors`` package,
        ``pip install 'probe-engine[export]'``) or ``"npz"`` (``numpy.savez``: plain arrays,
        readable with ``allow_pickle=False``); by default from the suffix of ``path``.
        Written to a temporary file beside ``path`` and then renamed: never half a file."""
        from ._export import save_weights

        save_weights(self, path, format)

    @staticmethod
    def load_weights(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """layer -> (W (D, C), b (C,)) float32 from a file :meth:`save_weights` wrote
        (either format), bit for bit, in its layer order."""
        from ._export import load_weights

        return load_weights(path)

    def to_parquet(self, path: str | os.PathLike, *, grid: bool = False) -> None:
        """Write :attr:`table` (``grid=True``: :attr:`grid`, every lambda tried) as Parquet
        with pyarrow (``pip install 'probe-engine[export]'``), the run's name, store and
        config as JSON in the file's key-value metadata under ``probe_engine``;
        ``pandas.read_parquet`` gives the same frame back."""
        from ._export import to_parquet

        to_parquet(self, path, grid=grid)
