"""Splits and batches: turn the ``data`` argument into reproducible row streams.

Every split becomes (dataset, index): row ``r`` of the split is item ``index[r]`` of the
dataset. Batches are drawn in row order, starting at any block boundary, so that a resumed
build sees exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler
from torch.utils.data.dataloader import default_collate

from .datasets import Batch
from .errors import DataError, InvalidArgumentError
from .format import ROOT_FOLDERS, check_name

DEFAULT_VALID_ROWS = 10_000


@dataclass
class SplitSource:
    """Rows of one split: item ``index[r]`` of ``dataset`` is row ``r``."""

    name: str
    dataset: Dataset
    index: np.ndarray  # (N,) int64
    source: str  # the split of the caller's data these rows come from
    num_workers: int = 0
    collate_fn: Any = None
    batch_size: int | None = None  # the caller's DataLoader's, if any

    def fetch(self, rows: list[int]) -> Batch:
        """The given rows as one validated batch."""
        return _Checked(self.dataset, self.name, self.collate_fn).__getitems__(
            [int(self.index[r]) for r in rows])

    @property
    def rows(self) -> int:
        return len(self.index)

    def batches(self, start: int, batch_size: int, *, pin_memory: bool = False,
                tokens: bool = False):
        """(inputs, labels) batches of rows [start, N), validated (``tokens``: labels are
        (B, T) per token, checked by :func:`engine._tokens.keep_mask`)."""
        loader = DataLoader(
            _Checked(self.dataset, self.name, self.collate_fn),
            batch_size=batch_size,
            sampler=self.index[start:].tolist(),
            collate_fn=_passthrough,
            num_workers=self.num_workers,
        )
        row = start
        for inputs, labels in loader:
            if not tokens:
                _check_labels(labels, self.name, row)
            # pinned here, not by the DataLoader, which fails on batches already on a GPU
            if pin_memory:
                inputs = (_pinned(inputs) if isinstance(inputs, torch.Tensor) else
                          {k: _pinned(v) for k, v in inputs.items()})
            yield inputs, labels
            row += len(labels)


def _passthrough(batch):
    return batch


def _pinned(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and not x.is_pinned():
        return x.pin_memory()
    return x


class _Checked(Dataset):
    """Wraps a dataset so that each fetched item is checked and named by its index."""

    def __init__(self, dataset: Dataset, split: str, collate_fn=None):
        self.dataset, self.split, self.collate_fn = dataset, split, collate_fn

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]) -> Batch:
        fetch = getattr(self.dataset, "__getitems__", None)
        items = fetch(indices) if fetch is not None else [self.dataset[i] for i in indices]
        if isinstance(items, Batch):
            return items
        for i, item in zip(indices, items, strict=True):
            check_item(item, self.split, i)
        collate = self.collate_fn or default_collate
        out = collate(list(items))
        if isinstance(out, Batch):
            return out
        inputs, labels = out[0], out[1]
        if not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(labels)
        return Batch(inputs, labels)


def check_item(item: Any, split: str, index: int) -> None:
    """An item must be ``(tensor, int label)``."""
    where = f"split {split!r}, dataset item {index}"
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise DataError(
            f"{where} is a {type(item).__name__}, not an (input, label) pair; wrap the dataset "
            f"so that it returns (tensor, int)"
        )
    x, y = item[0], item[1]
    tensors = isinstance(x, Mapping) and x and all(isinstance(v, torch.Tensor)
                                                   for v in x.values())
    if not isinstance(x, torch.Tensor) and not tensors:
        raise DataError(f"{where}: the input is a {type(x).__name__}, not a torch.Tensor (nor "
                        f"a dict of them: the model's keyword arguments); add a ToTensor() "
                        f"transform")
    if isinstance(y, torch.Tensor):
        if y.numel() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise DataError(f"{where}: the label is a {y.dtype} tensor of shape "
                            f"{tuple(y.shape)}, not one integer class index")
    elif isinstance(y, bool) or not isinstance(y, numbers.Integral):
        raise DataError(f"{where}: the label is {y!r} ({type(y).__name__}), not an integer "
                        f"class index; map labels to 0..C-1 first")


def _check_labels(labels: torch.Tensor, split: str, row: int) -> None:
    if labels.ndim != 1:
        raise DataError(f"split {split!r}, rows {row}..: labels have shape "
                        f"{tuple(labels.shape)}, expected (batch,)")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise DataError(f"split {split!r}, rows {row}..: labels are {labels.dtype}, not "
                        f"integer class indices; convert them (e.g. target_transform=int)")
    neg = (labels < 0).nonzero()
    if len(neg):
        r = row + int(neg[0])
        raise DataError(f"split {split!r}, row {r}: label {int(labels[neg[0]])} is negative; "
                        f"labels must be class indices 0..C-1")


def _loader_parts(loader: DataLoader, split: str) -> tuple[Dataset, np.ndarray, dict]:
    if loader.batch_size is None:
        raise DataError(f"split {split!r}: a DataLoader with a custom batch_sampler cannot be "
                        f"replayed from a given row; pass its Dataset instead")
    if loader.drop_last:
        raise DataError(f"split {split!r}: the DataLoader has drop_last=True, which would "
                        f"lose rows; use drop_last=False")
    if isinstance(loader.sampler, RandomSampler):
        raise DataError(f"split {split!r}: the DataLoader shuffles, so its rows cannot be "
                        f"reproduced on resume; use shuffle=False (rows are stored in order)")
    if isinstance(loader.sampler, SequentialSampler):
        index = np.arange(len(loader.dataset), dtype=np.int64)
    elif isinstance(loader.sampler, (range, list, tuple, np.ndarray)):
        index = np.asarray(list(loader.sampler), dtype=np.int64)
    else:
        raise DataError(f"split {split!r}: sampler {type(loader.sampler).__name__} may not "
                        f"replay the same rows on resume; pass the Dataset (or a list sampler)")
    extra = {"num_workers": loader.num_workers, "batch_size": loader.batch_size}
    if loader.collate_fn is not default_collate:
        extra["collate_fn"] = loader.collate_fn
    return loader.dataset, index, extra


def _source(name: str, data: Any) -> tuple[Dataset, np.ndarray, dict]:
    if isinstance(data, DataLoader):
        return _loader_parts(data, name)
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise DataError(f"split {name!r}: expected a torch Dataset or DataLoader, got "
                        f"{type(data).__name__}")
    return data, np.arange(len(data), dtype=np.int64), {}


def resolve_splits(data: Any, *, valid_size: int | float | str, seed: int) -> list[SplitSource]:
    """Turn ``data`` into splits. A single dataset (or a mapping without ``"valid"``) gives
    up its ``valid_size`` rows (``"auto"``: 10,000 or 10%, whichever is smaller), drawn with
    ``seed``, to a ``"valid"`` split; both keep their rows in source order."""
    parts = dict(data) if isinstance(data, Mapping) else {"train": data}
    if not parts:
        raise DataError("`data` is an empty mapping; give at least a 'train' split")
    splits = []
    for name, part in parts.items():
        check_name(name, "split name", DataError)
        if name in ROOT_FOLDERS:
            raise DataError(f"split name {name!r} is taken by the store's own {name}/ folder; "
                            f"call the split something else")
        dataset, index, extra = _source(name, part)
        if len(index) == 0:
            raise DataError(f"split {name!r} is empty (0 rows); give it some data or leave it out")
        splits.append(SplitSource(name, dataset, index, name, **extra))
    if "valid" in parts or valid_size in (0, None):
        return splits
    if "train" not in parts:
        return splits
    train = splits[[s.name for s in splits].index("train")]
    n = train.rows
    if valid_size == "auto":
        k = min(DEFAULT_VALID_ROWS, n // 10)
    elif isinstance(valid_size, float) and 0 < valid_size < 1:
        k = int(round(n * valid_size))
    elif isinstance(valid_size, numbers.Integral) and valid_size > 0:
        k = int(valid_size)
    else:
        raise InvalidArgumentError(f"valid_size must be 'auto', a fraction in (0, 1) or a "
                                   f"row count, not {valid_size!r}")
    if not 0 < k < n:
        raise DataError(f"cannot carve {k} validation rows out of {n} training rows; pass "
                        f"valid_size=0 or a 'valid' split")
    rng = np.random.default_rng(seed)
    take = np.zeros(n, dtype=bool)
    take[rng.choice(n, size=k, replace=False)] = True
    valid = SplitSource("valid", train.dataset, train.index[take], "train",
                        train.num_workers, train.collate_fn, train.batch_size)
    train.index = train.index[~take]
    at = splits.index(train) + 1
    splits.insert(at, valid)
    return splits


def check_targets(splits: Sequence[SplitSource], num_classes: int | None) -> None:
    """Check the labels of every split before anything is written, where the dataset lists
    them (a ``targets`` attribute, as torchvision's datasets and ``ArrayDataset`` have): each
    an integer class index, non-negative, and below ``num_classes`` (given, or the number
    of the dataset's ``classes``). Datasets without ``targets`` are checked batch by batch
    during the capture."""
    for s in splits:
        targets = getattr(s.dataset, "targets", None)
        if targets is None:
            continue
        try:
            t = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets)
        except (TypeError, ValueError):
            continue
        if t.ndim != 1 or len(t) != len(s.dataset):
            continue  # not one label per item: not the convention this check knows
        t = t[s.index]
        where = f"split {s.name!r}"
        if t.dtype.kind not in "iu":
            bad = next((r for r, v in enumerate(t.tolist())
                        if isinstance(v, bool) or not isinstance(v, numbers.Integral)), 0)
            raise DataError(f"{where}, row {bad}: the label is {t[bad]!r} ({t.dtype}), not an "
                            f"integer class index (dataset item {int(s.index[bad])}); map "
                            f"labels to 0..C-1 first")
        if not len(t):
            continue
        if int(t.min()) < 0:
            bad = int(np.flatnonzero(t < 0)[0])
            raise DataError(f"{where}, row {bad}: label {int(t[bad])} is negative (dataset "
                            f"item {int(s.index[bad])}); labels must be class indices 0..C-1")
        classes = getattr(s.dataset, "classes", None)
        n = num_classes if num_classes is not None else (
            len(classes) if classes is not None else None)
        if n is not None and int(t.max()) >= n:
            bad = int(np.flatnonzero(t >= n)[0])
            raise DataError(f"{where}, row {bad}: label {int(t[bad])} is out of range for {n} "
                            f"classes (dataset item {int(s.index[bad])}); pass num_classes= "
                            f"or fix the labels. Nothing was written.")


def sample_digest(split: SplitSource, samples: int = 3) -> str:
    """A digest of a few items (first, middle, last) and the row index of a split: cheap,
    and enough to tell one dataset from another on resume."""
    h = hashlib.blake2b(digest_size=16)
    h.update(split.index.tobytes())
    positions = sorted({0, split.rows // 2, split.rows - 1})[:samples]
    batch = split.fetch(positions)
    inputs = batch.inputs if isinstance(batch.inputs, Mapping) else {"": batch.inputs}
    for key in sorted(inputs):
        h.update(key.encode())
        h.update(inputs[key].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    h.update(batch.labels.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def extra_labels(spec: Any, splits: Sequence[SplitSource]) -> dict[str, Any]:
    """Validate ``labels=``: name -> callable(y) or per-source-dataset array(s)."""
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise DataError("labels= takes a mapping {name: callable(y) or array}, e.g. "
                        "{'coarse': lambda y: y // 3}")
    out = {}
    for name, value in spec.items():
        if name == "y":
            raise DataError("extra label name 'y' is taken by the dataset's own targets; "
                            "choose another name")
        check_name(name, "extra label name", DataError)
        if callable(value):
            out[name] = value
            continue
        per = value if isinstance(value, Mapping) else None
        for s in splits:
            arr = per.get(s.source) if per is not None else value
            if arr is None:
                raise DataError(f"labels[{name!r}] has no array for split {s.source!r}")
            arr = np.asarray(arr)
            if arr.ndim != 1 or arr.shape[0] < int(s.index.max()) + 1:
                raise DataError(f"labels[{name!r}] for split {s.source!r} has shape "
                                f"{arr.shape}; it needs one label per item of that dataset "
                                f"({len(s.dataset)})")
        out[name] = value
    return out


def compute_extra(name: str, value: Any, split: SplitSource, y: np.ndarray,
                  index: np.ndarray) -> np.ndarray:
    """Extra labels of one block of rows: ``value(y)`` or ``array[index]``."""
    if callable(value):
        out = np.asarray(value(y))
    else:
        arr = value[split.source] if isinstance(value, Mapping) else value
        out = np.asarray(arr)[index]
    if out.shape != y.shape or not np.issubdtype(out.dtype, np.integer):
        raise DataError(f"labels[{name!r}] gave {out.dtype} of shape {out.shape} for split "
                        f"{split.name!r}; expected integers of shape {y.shape}")
    if (out < 0).any():
        raise DataError(f"labels[{name!r}] has negative values on split {split.name!r}")
    return out.astype(np.int64, copy=False)
