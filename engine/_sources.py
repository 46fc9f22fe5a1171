"""Where a solve's features and labels come from: a store, or arrays in memory.

:class:`ProbeData` is what the fitting code sees either way: the layers and their widths,
every split's labels (checked, in memory: labels are small) and a reader of features row
range by row range (read lazily, checked finite as they are read).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import (
    DataError,
    LayerNotFoundError,
    NonFiniteError,
    ProbeEngineWarning,
    SplitNotFoundError,
    StoreError,
)
from .store import Store

__all__ = ["ProbeData"]

#: rows per read when streaming arrays that have no block size of their own
DEFAULT_BLOCK_ROWS = 8192


@dataclass
class ProbeData:
    """Where the features are (read lazily, row range by row range) and the labels
    (split -> (N,) int64, in memory).

    Build one with :meth:`from_store` or :meth:`from_arrays`: they check everything that
    can be checked before a fit starts (layers, labels, shapes, classes).
    """

    reader: Callable[[str, str, int, int], Any]
    dims: dict[str, int]
    labels: dict[str, torch.Tensor]
    num_classes: int
    layers: list[str]
    info: dict[str, dict] = field(default_factory=dict)
    block_rows: int = DEFAULT_BLOCK_ROWS  # rows per read when streaming (a store: its chunk)
    stored: dict[str, torch.dtype] = field(default_factory=dict)  # dtype a read returns
    offset: int = 0  # a row shard's first row in its split (errors name rows of the split)
    #: split -> (N,) the item each row belongs to (a token store: rows of one sequence are
    #: resampled together by the bootstrap); absent: every row an item of its own
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    #: split -> (N,) token ids of a token store's rows (its "token" label set), for the
    #: control task; None without them
    types: dict[str, np.ndarray] | None = None
    token_rows: bool = False
    #: split -> its rows in the source and a digest of a sample of them (the store's
    #: record): two splits with the same hold the same rows
    sources: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: labels are (N, C) 0 / 1 (several classes per row): sigmoid probes, one per class
    multilabel: bool = False

    def __post_init__(self) -> None:
        for layer in self.layers:
            self.stored.setdefault(layer, torch.float32)

    @property
    def splits(self) -> list[str]:
        return list(self.labels)

    def rows(self, split: str) -> int:
        return int(self.labels[split].shape[0])

    def read(self, split: str, layer: str, start: int = 0, stop: int | None = None
             ) -> torch.Tensor:
        """Rows [start, stop) of ``layer`` on ``split`` as a CPU tensor, checked finite."""
        stop = self.rows(split) if stop is None else stop
        x = _as_tensor(self.reader(split, layer, start, stop))
        if not x.is_floating_point():
            raise DataError(f"layer {layer!r}, split {split!r}: features are {x.dtype}, not "
                            f"floating point")
        _check_finite(x, layer, split, self.offset + start)
        return x

    def shard(self, split: str, start: int, stop: int) -> ProbeData:
        """Rows [start, stop) of ``split`` alone: a row shard, read from the same source
        (row 0 of the shard is row ``start`` of the split)."""
        reader = self.reader

        def read(s: str, layer: str, a: int, b: int):
            return reader(s, layer, start + a, start + b)

        return ProbeData(read, self.dims, {split: self.labels[split][start:stop]},
                         self.num_classes, self.layers, self.info, self.block_rows,
                         self.stored, self.offset + start)

    @classmethod
    def from_store(cls, store: Store, layers: list[str] | None, label: str,
                   allow_partial: bool) -> ProbeData:
        """The committed rows of ``store``: ``layers`` (default all, in network order) and
        the label set ``label``; an incomplete store only with ``allow_partial``."""
        if not store.complete and not allow_partial:
            counts = ", ".join(f"{s} {store.committed(s)}/{store.rows(s)}"
                               for s in store.splits)
            raise StoreError(f"the build of {store.path} is incomplete ({counts} rows "
                             f"committed); finish it with build_store(..., resume=True), or "
                             f"pass allow_partial=True to solve on the committed rows")
        chosen = list(store.layers) if layers is None else list(layers)
        for layer in chosen:
            store.layer_info(layer)  # LayerNotFoundError listing what exists
        chosen = [layer for layer in store.layers if layer in set(chosen)]  # network order
        labels = {s: torch.from_numpy(store.labels(s, label)) for s in store.splits
                  if store.committed(s) > 0}
        if "train" not in labels:
            raise SplitNotFoundError(f"{store.path} has no committed 'train' rows to fit on "
                                     f"(splits: {store.splits}); finish the build with "
                                     f"build_store(..., resume=True)")
        info = {layer: {k: store.layer_info(layer)[k] for k in ("site", "dim", "reduction")}
                for layer in chosen}
        dims = {layer: info[layer]["dim"] for layer in chosen}
        # what Store.read returns: float16 or float32 (bfloat16 stores decode to float32)
        stored = {layer: torch.float16 if store.dtype == "float16" else torch.float32
                  for layer in chosen}
        data = _checked(store.read, dims, labels, chosen, info, store.num_classes(label),
                        store.block_rows, stored)
        data.sources = {s: (v.rows, v.digest) for s, v in store.meta.dataset.splits.items()
                        if s in labels}
        if store.token_rows:
            data.token_rows = True
            data.groups = {s: store.index(s)[: len(y)] for s, y in labels.items()}
            if "token" in store.label_names():
                data.types = {s: store.labels(s, "token") for s in labels}
        return data

    @classmethod
    def from_arrays(cls, source: Mapping, labels: Any, layers: list[str] | None
                    ) -> ProbeData:
        """``{layer: (N, D) array}`` (one "train" split) or ``{split: {layer: array}}``,
        numpy, torch or zarr arrays, with ``labels`` an (N,) array or ``{split: array}``."""
        first = next(iter(source.values()), None)
        by_split = source if isinstance(first, Mapping) else {"train": source}
        if labels is None:
            raise DataError("solve(mapping) needs labels=: an (N,) array, or {split: array}")
        labels = labels if isinstance(labels, Mapping) else {"train": labels}
        if set(labels) != set(by_split):
            raise DataError(f"labels are given for splits {sorted(labels)}, features for "
                            f"{sorted(by_split)}; give both for the same splits")
        if "train" not in by_split:
            raise SplitNotFoundError(f"no 'train' split to fit on; splits: {sorted(by_split)}")
        chosen = list(by_split["train"]) if layers is None else list(layers)
        y = {s: _as_labels(v, s) for s, v in labels.items()}
        dims = {}
        for split, layers_of in by_split.items():
            missing = [layer for layer in chosen if layer not in layers_of]
            if missing:
                raise LayerNotFoundError(f"split {split!r} has no features for {missing}; it "
                                         f"has {sorted(layers_of)}")
            for layer in chosen:
                shape = tuple(layers_of[layer].shape)
                if len(shape) != 2 or shape[0] != y[split].shape[0]:
                    raise DataError(f"layer {layer!r}, split {split!r}: features of shape "
                                    f"{shape} do not match {y[split].shape[0]} labels")
                if shape[1] == 0:
                    raise DataError(f"layer {layer!r}, split {split!r} has zero features "
                                    f"(shape {shape}); leave it out")
                if dims.setdefault(layer, shape[1]) != shape[1]:
                    raise DataError(f"layer {layer!r} has {dims[layer]} features on one "
                                    f"split and {shape[1]} on {split!r}")
        info = {layer: {"site": "", "dim": dims[layer], "reduction": ""} for layer in chosen}
        stored = {layer: _dtype_of(by_split["train"][layer]) for layer in chosen}

        def reader(split: str, layer: str, start: int, stop: int):
            return by_split[split][layer][start:stop]

        data = _checked(reader, dims, y, chosen, info, None, DEFAULT_BLOCK_ROWS, stored)
        data.sources = {s: _digest(data, s) for s in data.splits} if chosen else {}
        return data


def _digest(data: ProbeData, split: str) -> tuple[int, str]:
    """(rows, a digest of the labels and of three rows of the first layer) of ``split``:
    equal for splits that hold the same rows."""
    h = hashlib.blake2b(digest_size=16)
    h.update(data.labels[split].numpy().tobytes())
    n = data.rows(split)
    for r in sorted({0, n // 2, n - 1}):
        h.update(data.read(split, data.layers[0], r, r + 1).float().numpy().tobytes())
    return n, h.hexdigest()


def _dtype_of(x: Any) -> torch.dtype:
    """The torch dtype a read of array ``x`` gives (float32 for what is not a float)."""
    if isinstance(x, torch.Tensor):
        return x.dtype if x.is_floating_point() else torch.float32
    kind = np.dtype(x.dtype)
    return {np.dtype("float16"): torch.float16, np.dtype("float64"): torch.float64}.get(
        kind, torch.float32)


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    a = np.ascontiguousarray(x[:] if hasattr(x, "chunks") else x)
    return torch.from_numpy(a if a.flags.writeable else a.copy())  # e.g. np.load(mmap_mode="r")


def _as_labels(y: Any, split: str) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        a = np.asarray(y[:] if hasattr(y, "chunks") else y)
        if a.dtype.kind not in "biuf":
            raise DataError(f"labels of split {split!r} are {a.dtype}, not integer class "
                            f"indices; map them to 0..C-1 first")
    return _as_tensor(y)


def _checked(reader, dims, labels, layers, info, num_classes, block_rows, stored
             ) -> ProbeData:
    if any(y.ndim == 2 for y in labels.values()):
        return _checked_multilabel(reader, dims, labels, layers, info, block_rows, stored)
    for split, y in labels.items():
        if y.ndim != 1 or y.is_floating_point() or y.dtype == torch.bool:
            raise DataError(f"labels of split {split!r} must be (N,) integers, got "
                            f"{y.dtype} of shape {tuple(y.shape)}")
        labels[split] = y.to(torch.int64)
    for split, y in labels.items():
        if y.numel() == 0:
            raise DataError(f"split {split!r} has no rows; give it some or leave it out")
    y_train = labels["train"]
    top = max(int(y.max()) for y in labels.values() if y.numel())
    c = int(num_classes) if num_classes else top + 1
    for split, y in labels.items():
        bad = ((y < 0) | (y >= c)).nonzero()
        if len(bad):
            r = int(bad[0])
            raise DataError(f"split {split!r}, row {r}: label {int(y[r])} is out of range for "
                            f"{c} classes")
    present = torch.bincount(y_train, minlength=c) > 0
    if int(present.sum()) < 2:
        raise DataError(f"the train split has one class only ({int(y_train[0])}); a probe "
                        f"needs at least two")
    seen = set(present.nonzero().view(-1).tolist())
    for split, y in labels.items():
        unseen = sorted(set(torch.unique(y).tolist()) - seen)
        if unseen and split != "train":
            # stacklevel: _checked <- ProbeData.from_* <- the caller's caller (engine.solve)
            warnings.warn(f"split {split!r} has classes never seen in train: {unseen[:10]}; "
                          f"their rows count as errors", ProbeEngineWarning, stacklevel=4)
    return ProbeData(reader, dims, labels, c, list(layers), info, block_rows, stored)


def _checked_multilabel(reader, dims, labels, layers, info, block_rows, stored
                        ) -> ProbeData:
    """Multi-label sets: (N, C) of 0 / 1 on every split, one C; float32 targets."""
    widths = {split: tuple(y.shape[1:]) for split, y in labels.items()}
    if any(len(w) != 1 for w in widths.values()) or len(set(widths.values())) > 1:
        raise DataError(f"multi-label targets must be (N, C) on every split with one C; "
                        f"got {({s: tuple(y.shape) for s, y in labels.items()})}")
    for split, y in labels.items():
        if y.numel() == 0:
            raise DataError(f"split {split!r} has no rows; give it some or leave it out")
        bad = ((y != 0) & (y != 1)).nonzero()
        if len(bad):
            r, c = (int(v) for v in bad[0])
            raise DataError(f"split {split!r}, row {r}, class {c}: multi-label targets are "
                            f"0 or 1, not {float(y[r, c])}")
        labels[split] = y.to(torch.float32)
    data = ProbeData(reader, dims, labels, int(widths["train"][0]), list(layers), info,
                     block_rows, stored)
    data.multilabel = True
    return data


def _check_finite(x: torch.Tensor, layer: str, split: str, offset: int = 0) -> None:
    """NonFiniteError naming the first row of ``x`` (rows from ``offset``) that holds a
    NaN or an inf. Every read of a solve is checked: min and max carry a NaN or an inf,
    exactly and at the speed of one pass in the stored dtype (a float64 sum of float16
    features took a third of an SGD epoch)."""
    step = 1 << 16
    for r0 in range(0, x.shape[0], step):
        block = x[r0 : r0 + step]
        if block.numel() == 0 or all(math.isfinite(float(v)) for v in torch.aminmax(block)):
            continue
        row = offset + r0 + int((~torch.isfinite(block.float())).any(dim=1).nonzero()[0])
        raise NonFiniteError(f"layer {layer!r}, split {split!r}, row {row}: the features hold "
                             f"NaN or inf; rebuild those rows or leave the layer out")
