"""The feature store, read side: :class:`Store` (the arrays of a store built by
``build_store``, their checks, extra label sets and saved probe runs).

The layout itself is :mod:`engine.format`'s (docs/store-format.md); this module reads it.
Only committed rows are ever read: a block counts once ``rows_committed`` has moved past it.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from . import _zarr
from . import format as fmt
from .errors import (
    DataError,
    InvalidArgumentError,
    LabelNotFoundError,
    LayerNotFoundError,
    ProbeEngineError,
    SplitNotFoundError,
    StoreCorruptedError,
    StoreError,
    StoreExistsError,
)
from .results import ProbeResults

__all__ = ["Store", "VerifyReport", "open_store", "load_results"]


def _closest(name: str, options: list[str]) -> str:
    near = difflib.get_close_matches(name, options, n=5, cutoff=0.4)
    shown = near or options[:20]
    more = "" if near or len(options) <= 20 else f" (and {len(options) - 20} more)"
    return ", ".join(repr(o) for o in shown) + more


@dataclass
class VerifyReport:
    """What ``Store.verify()`` found: ``problems`` is empty when the store is sound."""

    path: str
    problems: list[str] = field(default_factory=list)
    chunks_checked: int = 0
    arrays_checked: int = 0
    #: (array path, row-chunk index) of every committed chunk that is missing or does not
    #: decode: what ``build_store(..., repair=True)`` rewrites
    bad_chunks: list[tuple[str, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        head = (f"{self.path}: {self.arrays_checked} arrays, {self.chunks_checked} chunks "
                f"checked, {len(self.problems)} problem(s)")
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])

    def other_problems(self) -> list[str]:
        """The problems that are not a bad chunk (a wrong shape, bad metadata, ...)."""
        keys = {f"{a}/c/{c}" for a, c in self.bad_chunks}
        return [p for p in self.problems if not any(p.startswith(k) for k in keys)]


class Store:
    """A probe-engine feature store (layout: :mod:`engine.format`).

    Open one with :func:`engine.open_store`; :func:`engine.build_store` returns one.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        what = fmt.describe_path(path)
        if what != "a probe-engine store":
            raise StoreError(
                f"{self.path} is not a probe-engine store ({what or 'nothing is there'}); "
                f"build one with engine.build_store(model, data, path={self.path!r})"
            )
        self.group = fmt.open_root(self.path)
        self._meta: fmt.StoreMeta | None = None
        self._meta_error: StoreCorruptedError | None = None
        try:
            self._meta = fmt.read_meta(self.group, self.path)
        except StoreCorruptedError as exc:  # opens, so that verify() can say what is wrong
            self._meta_error = exc

    # -- metadata ------------------------------------------------------------------------
    @property
    def meta(self) -> fmt.StoreMeta:
        """The root metadata (:class:`engine.format.StoreMeta`)."""
        if self._meta is None:
            raise self._meta_error
        return self._meta

    @property
    def layers(self) -> list[str]:
        """Layer keys in network order (``"input"``, module names, ``"<module>:input"``)."""
        return [layer.name for layer in self.meta.layers]

    @property
    def splits(self) -> list[str]:
        return list(self.meta.splits)

    def layer_info(self, layer: str) -> dict:
        """{name, module, site, call, shape, dim, reduction} of one layer."""
        info = self.meta.layer(layer)
        if info is None:
            raise LayerNotFoundError(
                f"layer {layer!r} is not in the store {self.path}; "
                f"it has {_closest(layer, self.layers)}"
            )
        return info.to_json()

    def rows(self, split: str) -> int:
        return self._split(split).rows

    def committed(self, split: str) -> int:
        """Rows of ``split`` whose every array is written (a prefix of the split)."""
        return self._split(split).rows_committed

    @property
    def complete(self) -> bool:
        return self.meta.complete

    @property
    def dtype(self) -> str:
        return self.meta.config.dtype

    @property
    def block_rows(self) -> int:
        """Rows of one block, the unit rows are written and committed in."""
        return self.meta.config.block_rows

    def _split(self, split: str) -> fmt.SplitMeta:
        info = self.meta.splits.get(split)
        if info is None:
            raise SplitNotFoundError(
                f"split {split!r} is not in the store {self.path}; it has {self.splits}")
        return info

    # -- arrays --------------------------------------------------------------------------
    def features(self, split: str, layer: str) -> zarr.Array:
        """The (N, D) zarr array of ``layer`` on ``split`` (bfloat16 stores: uint16 bits)."""
        self._split(split)
        self.layer_info(layer)
        return self.group[fmt.features_path(split, layer)]

    def label_names(self, split: str | None = None) -> list[str]:
        split = split or self.splits[0]
        self._split(split)
        return sorted(self.group[f"{split}/labels"].array_keys())

    def labels(self, split: str, name: str = "y", *, committed: bool = True) -> np.ndarray:
        """(N,) int64 labels ``name`` of ``split`` (only committed rows unless told)."""
        self._split(split)
        names = self.label_names(split)
        if name not in names:
            raise LabelNotFoundError(
                f"label {name!r} is not in the store {self.path} (split {split!r}); "
                f"it has {names}; add one with Store.add_labels({name!r}, ...)"
            )
        stop = self.committed(split) if committed else self.rows(split)
        return self._read(self.group[fmt.labels_path(split, name)], 0, stop)

    def index(self, split: str) -> np.ndarray:
        """(N,) int64: row -> index in the split's source dataset (of a store of token rows:
        the item, a sequence, the token belongs to)."""
        self._split(split)
        return self._read(self.group[fmt.index_path(split)], 0, self.rows(split))

    @property
    def token_rows(self) -> bool:
        """Whether a row is a token of a sequence (``build_store(..., rows="tokens")``)."""
        return self.meta.config.rows == "tokens"

    def positions(self, split: str) -> np.ndarray:
        """(N,) int64, a store of token rows only: each row's position in its sequence (its
        index among the sequence's token ids, padding not counted)."""
        self._split(split)
        if not self.token_rows:
            raise InvalidArgumentError(f"the store at {self.path} has a row per item, not per "
                                       f"token: it has no positions (see Store.index)")
        return self._read(self.group[fmt.position_path(split)], 0, self.rows(split))

    def num_classes(self, name: str = "y") -> int | None:
        arr = self.group[fmt.labels_path(self.splits[0], name)]
        n = arr.attrs.get("num_classes")
        return None if n is None else int(n)

    def reduction_indices(self, layer: str) -> np.ndarray | None:
        """Flat feature indices a subsample reduction kept, or None."""
        self.layer_info(layer)
        if self.meta.layer(layer).subsample is None:
            return None
        return self.group[fmt.indices_path(layer)][:]

    def read(self, split: str, layer: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of ``layer`` as numpy (float16 / float32; bfloat16 -> float32).

        Only committed rows can be read. A chunk that fails its checksum raises
        :class:`StoreCorruptedError` naming the array and chunk.
        """
        arr = self.features(split, layer)
        committed = self.committed(split)
        stop = committed if stop is None else stop
        if not 0 <= start <= stop <= committed:
            raise InvalidArgumentError(
                f"rows [{start}, {stop}) of {split}/{layer} are out of the committed range "
                f"[0, {committed}) of {self.path}"
                + ("" if self.complete else "; the build is incomplete: resume it first")
            )
        out = self._read(arr, start, stop)
        return fmt.bf16_bits_to_float32(out) if self.dtype == "bfloat16" else out

    def dask(self, split: str, layer: str):
        """Committed rows of ``layer`` on ``split`` as a dask array, a dask chunk per zarr
        chunk (bfloat16 stores: decoded to float32)."""
        import dask.array as da

        arr = da.from_zarr(self.features(split, layer))[: self.committed(split)]
        if self.dtype == "bfloat16":
            arr = arr.map_blocks(fmt.bf16_bits_to_float32, dtype=np.float32)
        return arr

    def _read(self, arr: zarr.Array, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of ``arr``; a chunk of the committed rows that is missing (it
        would read as fill values) or fails to decode raises StoreCorruptedError."""
        committed = self.committed(fmt.split_of(arr.path))
        self._check_present(arr, start, min(stop, committed))
        try:
            return arr[start:stop]
        except (ValueError, RuntimeError, OSError) as exc:
            bad = list(self._bad_chunks(arr, start, stop))
            if not bad:
                raise
            raise StoreCorruptedError(
                f"{self.path}: array {arr.path!r} has unreadable chunk(s) {bad} ({exc}); "
                f"{self._advice}") from exc

    @property
    def _advice(self) -> str:
        return (f"run `probe-engine verify {self.path}` to list every problem, then rewrite "
                f"them with build_store(model, data, {self.path!r}, resume=True, repair=True)")

    def _check_present(self, arr: zarr.Array, start: int, stop: int) -> None:
        if stop <= start:
            return
        step = arr.chunks[0]
        keys = [fmt.chunk_key(arr.path, c, arr.ndim)
                for c in range(start // step, math.ceil(stop / step))]
        missing = [k for k, ok in zip(keys, _zarr.exists_many(self.group.store, keys),
                                      strict=True) if not ok]
        if missing:
            raise StoreCorruptedError(
                f"{self.path}: array {arr.path!r} is missing chunk(s) {missing} of committed "
                f"rows (they would read as fill values); {self._advice}")

    def _bad_chunks(self, arr: zarr.Array, start: int, stop: int) -> Iterator[str]:
        step = arr.chunks[0]
        for c in range(start // step, math.ceil(stop / step)):
            try:
                arr[c * step : min((c + 1) * step, arr.shape[0])]
            except (ValueError, RuntimeError, OSError):
                yield fmt.chunk_key(arr.path, c, arr.ndim)

    # -- writes beside the features -------------------------------------------------------
    def add_labels(self, name: str, labels, *, num_classes: int | None = None,
                   overwrite: bool = False) -> None:
        """Add a label array ``name`` to every split, beside ``y``, without a new capture:
        another objective for the same features (the paper's section 3.6).

        Args:
            labels: ``callable(y) -> labels`` applied to each split's ``y`` (e.g.
                ``lambda y: COARSE[y]``), or ``{split: (N,) ints}`` for every split; or
                multi-label: (N, C) arrays of 0 / 1 (several classes per row, as VOC's),
                which ``solve(label=name)`` fits with sigmoid probes.
            num_classes: recorded like ``y``'s (default: the largest label + 1).
            overwrite: replace an existing label array of that name (never ``y``).
        """
        if name == "y":
            raise InvalidArgumentError("label name 'y' is the dataset's own targets; give a "
                                       "name other than 'y'")
        fmt.check_name(name, "label name")
        if not fmt.writable(self.path)[0]:
            raise StoreError(f"cannot add labels {name!r} to {self.path}: the store is "
                             f"read-only (no write permission); make it writable, or add "
                             f"them to a copy")
        if not self.complete:
            raise StoreError(f"{self.path} is not complete; finish the build (resume=True) "
                             f"before adding labels")
        values = {}
        for split in self.splits:
            y = self.labels(split)
            if callable(labels):
                v = labels(y)
            elif isinstance(labels, Mapping) and split in labels:
                v = labels[split]
            else:
                raise LabelNotFoundError(f"no {name!r} labels for split {split!r}: pass a "
                                         f"callable, or a mapping with every split "
                                         f"{self.splits}")
            v = np.asarray(v)
            multi = v.ndim == 2 and v.shape[0] == y.shape[0]
            if multi and not np.isin(v, (0, 1)).all():
                raise DataError(f"multi-label {name!r} of split {split!r}: an (N, C) label "
                                f"array holds 0 and 1 only")
            if not multi and (v.shape != y.shape or not np.issubdtype(v.dtype, np.integer)
                              or (v.size and v.min() < 0)):
                raise DataError(f"labels {name!r} of split {split!r}: need {y.shape[0]} "
                                f"non-negative integers (or an ({y.shape[0]}, C) array of "
                                f"0 / 1), got shape {v.shape} {v.dtype}")
            values[split] = v.astype(np.int64)
        if len({v.shape[1:] for v in values.values()}) > 1:
            raise DataError(f"labels {name!r}: every split needs the same kind (N,) or "
                            f"(N, C) with one C, got {[v.shape for v in values.values()]}")
        if name in self.label_names() and not overwrite:
            raise StoreExistsError(f"label {name!r} is already in {self.path}; pass "
                                   f"overwrite=True to replace it")
        top = max((int(v.max()) for v in values.values() if v.size), default=-1)
        n_classes = int(num_classes) if num_classes is not None else top + 1
        width = next(iter(values.values())).shape[1:]
        if width:  # multi-label: the classes are the columns
            top, n_classes = width[0] - 1, width[0]
        if top >= n_classes:
            raise DataError(f"labels {name!r} reach {top}, beyond num_classes={n_classes}")
        group = fmt.open_root(self.path, write=True)
        for split, v in values.items():
            fmt.write_label_array(group, self.meta, split, name, v, n_classes)

    def results(self, run: str = "default") -> ProbeResults:
        """The probes and metrics of a saved solve ``run`` (:func:`engine.load_results`)."""
        return load_results(self, run)

    # -- checks --------------------------------------------------------------------------
    def verify(self) -> VerifyReport:
        """Check metadata, every committed chunk's presence and checksum, row counts (every
        layer and label array has its split's rows), and that each committed row is a
        distinct dataset item: no item twice in a split, nor in two splits drawn from one
        source (train and its carved-out valid)."""
        report = VerifyReport(self.path)
        if self._meta is None:
            report.problems.append(f"metadata: {self._meta_error}")
            return report
        meta = self._meta
        storage_dtype = fmt.DTYPES[meta.config.dtype][0]
        for split, info in meta.splits.items():
            rows, committed = info.rows, info.rows_committed
            if not 0 <= committed <= rows:
                report.problems.append(f"{split}: rows_committed={committed} is outside "
                                       f"[0, {rows}]")
                continue
            arrays: list[tuple[str, int | None, np.dtype]] = [
                (fmt.features_path(split, layer.name), layer.dim, storage_dtype)
                for layer in meta.layers]
            arrays.append((fmt.index_path(split), None, np.dtype("int64")))
            if meta.config.rows == "tokens":
                arrays.append((fmt.position_path(split), None, np.dtype("int64")))
            try:
                label_names = self.label_names(split)
            except KeyError:
                label_names = []
                report.problems.append(f"{split}/labels: group is missing")
            for name in meta.config.labels:
                if name not in label_names:
                    report.problems.append(f"{fmt.labels_path(split, name)}: array is missing")
            arrays += [(fmt.labels_path(split, n), None, np.dtype("int64"))
                       for n in label_names]
            for name, dim, dtype in arrays:
                self._verify_array(report, name, rows, committed, dim, dtype)
        self._verify_rows(report)
        for layer in meta.layers:
            if layer.subsample is not None:
                k = layer.subsample
                self._verify_array(report, fmt.indices_path(layer.name), k, k, None,
                                   np.dtype("int64"))
        return report

    def _verify_rows(self, report: VerifyReport) -> None:
        seen: dict[str, tuple[str, np.ndarray]] = {}  # source -> (split, items so far)
        sources = self.meta.dataset.splits
        for split, info in self.meta.splits.items():
            name = fmt.index_path(split)
            if any(a == name for a, _ in report.bad_chunks) or not (
                    0 <= info.rows_committed <= info.rows):
                continue  # already reported
            try:
                items = self.group[name][: info.rows_committed]
            except (KeyError, ValueError, RuntimeError, OSError):
                continue  # reported by _verify_array
            if len(items) and int(items.min()) < 0:
                report.problems.append(f"{name}: row {int(np.argmax(items < 0))} points at "
                                       f"dataset item {int(items.min())}, which is negative")
            values, counts = np.unique(items, return_counts=True)
            if self.token_rows:  # an item's tokens are its rows: (item, position) once each
                try:
                    pos = self.group[fmt.position_path(split)][: info.rows_committed]
                except (KeyError, ValueError, RuntimeError, OSError):
                    pos = np.arange(len(items))  # reported by _verify_array
                pairs = np.unique(np.stack([items, pos]), axis=1).shape[1]
                if pairs < len(items):
                    report.problems.append(f"{name}: {len(items) - pairs} token row(s) repeat "
                                           f"an (item, position) pair")
            elif (counts > 1).any():
                twice = values[counts > 1]
                report.problems.append(f"{name}: {len(twice)} dataset item(s) stored more than "
                                       f"once, e.g. item {int(twice[0])}")
            source = sources[split].source if split in sources else split
            if source in seen:
                other, before = seen[source]
                both = np.intersect1d(before, values)
                if len(both):
                    report.problems.append(f"{name}: {len(both)} dataset item(s) of source "
                                           f"{source!r} are also in split {other!r}, e.g. "
                                           f"item {int(both[0])}")
                seen[source] = (f"{other}, {split}", np.union1d(before, values))
            else:
                seen[source] = (split, values)

    def _verify_array(self, report: VerifyReport, name: str, rows: int, committed: int,
                      dim: int | None, dtype: np.dtype) -> None:
        try:
            arr = self.group[name]
        except KeyError:
            report.problems.append(f"{name}: array is missing")
            return
        report.arrays_checked += 1
        expected = (rows,) if dim is None else (rows, dim)
        if arr.shape != expected:
            report.problems.append(f"{name}: shape {arr.shape}, expected {expected}")
            return
        if arr.dtype != dtype:
            report.problems.append(f"{name}: dtype {arr.dtype}, expected {dtype}")
            return
        step = arr.chunks[0]
        present = set(_zarr.list_prefix(self.group.store, fmt.chunk_prefix(name)))
        for c in range(math.ceil(committed / step)):
            key = fmt.chunk_key(name, c, arr.ndim)
            report.chunks_checked += 1
            if key not in present:
                report.problems.append(f"{key}: chunk is missing (rows {c * step}..)")
                report.bad_chunks.append((name, c))
                continue
            try:
                arr[c * step : min((c + 1) * step, rows)]
            except (ValueError, RuntimeError, OSError) as exc:
                report.problems.append(f"{key}: chunk is corrupted ({exc})")
                report.bad_chunks.append((name, c))

    # -- presentation --------------------------------------------------------------------
    def summary(self) -> str:
        """A few lines for people: splits, layers, dims, reductions, size on disk."""
        m = self.meta
        lines = [
            f"probe-engine store {self.path} (format {m.format}, {m.config.dtype})",
            f"model: {m.model.cls} ({m.model.parameters} parameters)",
            "splits: " + ", ".join(
                f"{s} {i.rows_committed}/{i.rows} rows" for s, i in m.splits.items()),
            f"labels: {', '.join(self.label_names())} (classes: {self.num_classes()})",
            f"{'layer':<32} {'shape':<18} {'dim':>8}  reduction",
        ]
        for layer in m.layers:
            shape = "x".join(str(s) for s in layer.shape)
            lines.append(f"{layer.name:<32} {shape:<18} {layer.dim:>8}  {layer.reduction}")
        runs = fmt.run_names(self.group)
        if runs:
            lines.append(f"probe runs: {', '.join(runs)}")
        if fmt.is_local(self.path):
            size = sum(f.stat().st_size for f in Path(self.path).rglob("*") if f.is_file())
            lines.append(f"on disk: {size / 2**20:.1f} MiB")
        lines.append("complete" if self.complete else "INCOMPLETE: resume the build to finish it")
        return "\n".join(lines)

    def __repr__(self) -> str:
        try:
            return (f"Store({self.path!r}, splits={self.splits}, layers={len(self.layers)}, "
                    f"complete={self.complete})")
        except ProbeEngineError:
            return f"Store({self.path!r}, metadata unreadable)"


def open_store(path: str | os.PathLike) -> Store:
    """Open an existing store read-only."""
    return Store(path)


def load_results(path: str | os.PathLike | Store, run: str = "default") -> ProbeResults:
    """The results of ``run`` saved in the store at ``path``."""
    store = path if isinstance(path, Store) else Store(path)
    config = fmt.run_config(store.group, store.path, run)
    records = fmt.saved_probes(store.group, run)
    order = [layer for layer in store.layers if layer in records]
    info = {layer: {k: store.layer_info(layer)[k] for k in ("site", "dim", "reduction")}
            for layer in order}
    label = config.get("label", "y")
    scored = [s for s in store.splits if store.committed(s) > 0]
    labels = {s: store.labels(s, label) for s in scored}
    groups = {s: store.index(s)[: len(labels[s])] for s in scored} if store.token_rows else None
    return ProbeResults.from_records({layer: records[layer] for layer in order}, info,
                                     config=config, run=run, path=store.path, labels=labels,
                                     groups=groups)
