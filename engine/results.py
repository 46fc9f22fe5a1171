"""Probe results: the table people read, the weights pipelines use, and their home in the
store (``probes/<run>/<layer>/{W,b}``, JSON attributes, no pickles)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import zarr

from ._data import check_name
from .errors import RunNotFoundError, StoreError, StoreMismatchError
from .store import ATTR, Store, writable

__all__ = ["ProbeResults", "load_results"]

COLUMNS = ["layer", "split", "site", "dim", "reduction", "l2", "iterations", "converged",
           "loss", "top1_error", "top5_error", "seconds"]


@dataclass
class ProbeResults:
    """What ``engine.solve`` found.

    ``table``: one row per (layer, split) for the chosen lambda of each layer, columns
    :data:`COLUMNS`. ``grid``: every lambda tried, one row per (layer, l2). ``weights``:
    layer -> (W (D, C) float32, b (C,) float32). ``backends``: layer -> the device, the
    loss / gradient kernel and the matmul precision it was solved with.
    """

    table: pd.DataFrame
    grid: pd.DataFrame
    weights: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False)
    config: dict = field(default_factory=dict)
    run: str | None = None
    path: str | None = None
    #: layer -> how it was solved: {"device", "kernel" ("cuda" fused or "torch"), "matmul"}
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


# -- in the store ------------------------------------------------------------------------
def _group(store: Store, mode: str = "r+") -> zarr.Group:
    try:
        return zarr.open_group(store._zstore if mode == "r" else _writable(store), mode=mode)
    except PermissionError as exc:
        raise StoreError(f"cannot write probes into {store.path}: {exc}") from exc


def _writable(store: Store):
    from .store import _zarr_store

    return _zarr_store(store.path, read_only=False)


def start_run(store: Store, run: str, config: dict) -> None:
    """Create ``probes/<run>`` with ``config``, or check that an existing one matches."""
    check_name(run, "run name")
    if not writable(f"{store.path}/probes")[0]:  # the store itself while probes/ is absent
        raise StoreError(f"cannot write probes into {store.path}: the store is read-only (no "
                         f"write permission); make it writable, or solve a copy")
    root = _group(store)
    fingerprint = {"model": store.meta["model"]["digest"],
                   "dataset": {s: v["digest"] for s, v in
                               store.meta["dataset"]["splits"].items()},
                   "committed": {s: v["rows_committed"] for s, v in store.meta["splits"].items()}}
    wanted = _json({"config": config, "fingerprint": fingerprint})
    path = f"probes/{run}"
    if path in root:
        have = dict(root[path].attrs.get(ATTR, {}))
        if have != wanted:
            raise StoreMismatchError(
                f"run {run!r} in {store.path} was solved with another config or on other "
                f"rows ({have.get('config')} vs {wanted['config']}); choose another run= "
                f"name, or delete probes/{run}")
        return
    root.create_group(path, attributes={ATTR: wanted})


def saved_layers(store: Store, run: str) -> dict[str, dict]:
    """Records of the layers of ``run`` whose probes are completely saved."""
    root = _group(store, "r")
    path = f"probes/{run}"
    if path not in root:
        return {}
    out = {}
    for layer in root[path].group_keys():
        g = root[f"{path}/{layer}"]
        rec = g.attrs.get(ATTR)
        if rec and rec.get("complete") and "W" in g and "b" in g:
            rec = dict(rec)
            rec["metrics"], rec["grid"] = _nan(rec["metrics"]), _nan(rec["grid"])
            out[layer] = {**rec, "W": g["W"][:], "b": g["b"][:]}
    return out


def save_layer(store: Store, run: str, layer: str, record: dict) -> None:
    """Write one layer's probe; its ``complete`` mark goes last, so a kill in between
    leaves a layer that a rerun solves again."""
    root = _group(store)
    g = root.require_group(f"probes/{run}/{layer}")
    for name in ("W", "b"):
        data = np.ascontiguousarray(record[name], dtype=np.float32)
        arr = g.create_array(name, shape=data.shape, dtype="float32", chunks=data.shape,
                             overwrite=True)
        arr[...] = data
    attrs = {k: v for k, v in record.items() if k not in ("W", "b")}
    g.attrs[ATTR] = _json({**attrs, "complete": True})


def _json(x):
    """JSON-safe: NaN / inf -> None (top-5 error is undefined for C <= 5)."""
    if isinstance(x, dict):
        return {str(k): _json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def _nan(x):
    """Inverse of ``_json`` for metric values."""
    if isinstance(x, dict):
        return {k: _nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan(v) for v in x]
    return float("nan") if x is None else x


def load_results(path: str | Store, run: str = "default") -> ProbeResults:
    """The results of ``run`` saved in the store at ``path``."""
    store = path if isinstance(path, Store) else Store(path)
    check_name(run, "run name")
    root = _group(store, "r")
    if f"probes/{run}" not in root:
        runs = sorted(root["probes"].group_keys()) if "probes" in root else []
        raise RunNotFoundError(f"no run {run!r} in {store.path}; runs: {runs}")
    records = saved_layers(store, run)
    order = [layer for layer in store.layers if layer in records]
    info = {layer: {k: store.layer_info(layer)[k] for k in ("site", "dim", "reduction")}
            for layer in order}
    config = dict(root[f"probes/{run}"].attrs[ATTR])["config"]
    return ProbeResults.from_records({layer: records[layer] for layer in order}, info,
                                     config=config, run=run, path=store.path)
