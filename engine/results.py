"""Probe results: the table people read and the weights pipelines use. Their home in a store
is ``probes/<run>/<layer>/{W,b}`` (:mod:`engine.format`; :func:`engine.load_results` reads
them back)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

__all__ = ["ProbeResults", "COLUMNS"]

COLUMNS = ["layer", "split", "site", "dim", "reduction", "l2", "iterations", "converged",
           "loss", "top1_error", "top5_error", "seconds"]


@dataclass
class ProbeResults:
    """What ``engine.solve`` found.

    ``table``: one row per (layer, split) for the chosen lambda of each layer, columns
    :data:`COLUMNS`. ``grid``: every lambda tried, one row per (layer, l2). ``weights``:
    layer -> (W (D, C) float32, b (C,) float32). ``backends``: layer -> the device, the
    loss / gradient kernel and the matmul precision it was solved with, and where its
    features were (resident, streamed, or row shards on Dask workers).
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

    @classmethod
    def from_records(cls, records: dict[str, dict], info: dict[str, dict], *, config: dict,
                     run: str | None, path: str | None) -> ProbeResults:
        rows, grid, weights, backends = [], [], {}, {}
        for layer, rec in records.items():
            backends[layer] = dict(rec.get("backend", {}))
            meta = info.get(layer, {})
            for split, m in rec["metrics"].items():
                rows.append({"layer": layer, "split": split, "site": meta.get("site", ""),
                             "dim": meta.get("dim", int(rec["W"].shape[0])),
                             "reduction": meta.get("reduction", ""), "l2": rec["l2"],
                             "iterations": rec["iterations"], "converged": rec["converged"],
                             "loss": m["loss"], "top1_error": m["top1_error"],
                             "top5_error": m["top5_error"], "seconds": rec.get("seconds")})
            grid += [{"layer": layer, **g} for g in rec["grid"]]
            weights[layer] = (rec["W"], rec["b"])
        return cls(pd.DataFrame(rows, columns=COLUMNS), pd.DataFrame(grid), weights,
                   config, run, path, backends)

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
        for col in ("loss", "top1_error", "top5_error"):
            t[col] = t[col].map(lambda v: "" if v is None or math.isnan(v) else f"{v:.4f}")
        return t.drop(columns=["seconds"]).to_string(index=False)
