"""The feature store: a Zarr v3 group of per-split, per-layer feature matrices.

Layout (format version 1, see docs/store-format.md)::

    <root>/zarr.json                   attrs["probe_engine"]: format, model, dataset, layers,
                                       splits {rows, rows_committed, max_label}, config
    <root>/<split>/features/<layer>    (N, D) float16 | float32 | bfloat16 bits (uint16)
    <root>/<split>/labels/<name>       (N,) int64
    <root>/<split>/index               (N,) int64, row -> index in the source dataset
    <root>/reductions/<layer>/indices  (K,) int64, for subsample reductions

Every array is row-chunked, compressed with Blosc and checksummed with crc32c. Rows are
written in blocks of whole chunks; a block counts only once ``rows_committed`` has moved past
it, which happens after every array's chunks of that block are on disk.
"""

from __future__ import annotations

import asyncio
import difflib
import glob
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.storage
from zarr.codecs import BloscCodec, Crc32cCodec

from .errors import (
    DataError,
    InvalidArgumentError,
    LabelNotFoundError,
    LayerNotFoundError,
    SplitNotFoundError,
    StoreCorruptedError,
    StoreError,
    StoreExistsError,
)

__all__ = ["Store", "open_store", "FORMAT_VERSION", "VerifyReport"]

FORMAT_VERSION = 1
ATTR = "probe_engine"

#: Storage dtypes: name -> (numpy dtype on disk, fill value on disk). zarr-python has no
#: bfloat16 type, so bfloat16 features are stored as their raw uint16 bits (NaN = 0x7FC0).
DTYPES: dict[str, tuple[np.dtype, Any]] = {
    "float16": (np.dtype("float16"), float("nan")),
    "float32": (np.dtype("float32"), float("nan")),
    "bfloat16": (np.dtype("uint16"), 0x7FC0),
}

#: Largest chunk we write (bytes, uncompressed); the docs promise about 1-16 MB.
MAX_CHUNK_BYTES = 16 << 20


#: compressor name -> Blosc settings. Activations compress little (1.1-1.7x with lz4), so the
#: default favours speed: lz4 at level 1 without shuffle runs near memory speed and keeps the
#: writer close behind the forward pass (on float16 activations the byte shuffle cost 35%
#: more time for no better ratio: 1.11x vs 1.15x on the capture benchmark); "zstd" with
#: bit shuffle trades about 4x the CPU for about 1.4x smaller stores.
COMPRESSORS = {
    "lz4": {"cname": "lz4", "clevel": 1, "shuffle": "noshuffle"},
    "zstd": {"cname": "zstd", "clevel": 3, "shuffle": "bitshuffle"},
}


def compressors(name: str = "lz4") -> list:
    """Blosc then crc32c, so that any flipped byte fails the read."""
    if name not in COMPRESSORS:
        raise ValueError(f"compressor must be one of {sorted(COMPRESSORS)}, not {name!r}")
    return [BloscCodec(**COMPRESSORS[name]), Crc32cCodec()]


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 values (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def chunk_rows(block_rows: int, row_bytes: int) -> int:
    """Rows per chunk for an array whose rows are ``row_bytes`` long.

    The largest divisor of ``block_rows`` whose chunk stays under MAX_CHUNK_BYTES, so that a
    block is always a whole number of chunks.
    """
    for m in range(1, block_rows + 1):
        if block_rows % m == 0 and (block_rows // m) * row_bytes <= MAX_CHUNK_BYTES:
            return block_rows // m
    return 1


def _closest(name: str, options: list[str]) -> str:
    near = difflib.get_close_matches(name, options, n=5, cutoff=0.4)
    shown = near or options[:20]
    more = "" if near or len(options) <= 20 else f" (and {len(options) - 20} more)"
    return ", ".join(repr(o) for o in shown) + more


def is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path)


def writable(path: str | os.PathLike) -> tuple[bool, str]:
    """Whether this process may write at ``path`` (a local path not there yet: its nearest
    existing folder), and the path checked. URLs count as writable: only a write tells."""
    if not is_local(path):
        return True, str(path)
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return os.access(p, os.W_OK), str(p)


def _zarr_store(path: str | os.PathLike, *, read_only: bool):
    if is_local(path):
        return zarr.storage.LocalStore(Path(path), read_only=read_only)
    # a local file:// URL goes through fsspec too (as on a shared mount); its folders are
    # not created by the writes themselves
    options = {"auto_mkdir": True} if str(path).startswith("file://") else None
    return zarr.storage.FsspecStore.from_url(str(path), read_only=read_only,
                                             storage_options=options)


#: zarr's LocalStore writes every key to ``<name>.<32 hex>.partial`` and renames it over
#: ``<name>``; a process killed in between leaves such a file behind, never a torn key
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")


def partial_files(path: str | os.PathLike) -> list[Path]:
    """Temporary files that killed writers left in the local store at ``path``."""
    if not is_local(path) or not Path(path).is_dir():
        return []
    return [Path(d) / f for d, _, files in os.walk(path) for f in files if _PARTIAL.search(f)]


def remove_partial_files(path: str | os.PathLike) -> int:
    """Delete what :func:`partial_files` finds, and the folders a killed writer created and
    left empty (zarr warns about them); only a writer holding the lock may. Returns the
    number of files and folders removed."""
    if not is_local(path) or not Path(path).is_dir():
        return 0
    removed = 0
    for d, _, names in os.walk(path, topdown=False):
        for f in names:
            if _PARTIAL.search(f):
                Path(d, f).unlink(missing_ok=True)
                removed += 1
        if os.path.normpath(d) != os.path.normpath(path) and not os.listdir(d):
            os.rmdir(d)
            removed += 1
    return removed


def describe_path(path: str | os.PathLike) -> str | None:
    """None when ``path`` is free for a new store (absent, an empty folder, or one holding
    only the temporary files of a creation that was killed), else what is there
    ("a probe-engine store", "a file", ...)."""
    if not is_local(path):
        try:
            group = zarr.open_group(_zarr_store(path, read_only=True), mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            return None
        return "a probe-engine store" if ATTR in group.attrs else "a zarr group of another tool"
    p = Path(path)
    if not p.exists():
        return None
    if not p.is_dir():
        return "a file"
    if not any(p.iterdir()):
        return None
    meta = p / "zarr.json"
    if not meta.exists() and all(
            _PARTIAL.search(f.name) for f in p.rglob("*") if not f.is_dir()):
        return None  # killed while writing its very first key
    if not meta.exists():
        return "a folder that is not a zarr store"
    try:
        group = zarr.open_group(_zarr_store(p, read_only=True), mode="r")
    except Exception:  # noqa: BLE001 - anything unreadable there is "not a store"
        return "a folder with an unreadable zarr.json"
    return "a probe-engine store" if ATTR in group.attrs else "a zarr group of another tool"


def remove_store(path: str | os.PathLike) -> None:
    """Delete a store (local folder or fsspec URL) entirely.

    A local folder is first renamed aside (atomic), so that a process killed while deleting
    leaves either the whole store or a free path, never a half-deleted store; what a killed
    deletion leaves is a hidden ``.<name>.deleting-*`` folder beside it, removed by the next
    deletion.
    """
    if is_local(path):
        p = Path(path).absolute()
        aside = p.with_name(f".{p.name}.deleting-{uuid.uuid4().hex}")
        os.rename(p, aside)
        shutil.rmtree(aside)
        for old in p.parent.glob(f".{glob.escape(p.name)}.deleting-*"):
            shutil.rmtree(old, ignore_errors=True)  # of an earlier, killed deletion
    else:
        from zarr.core.sync import sync

        sync(_zarr_store(path, read_only=False).delete_dir(""))


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


class Store:
    """A probe-engine feature store (see the module docstring for the layout).

    Open one with :func:`engine.open_store`; :func:`engine.build_store` returns one.
    """

    def __init__(self, path: str | os.PathLike, *, read_only: bool = True):
        self.path = str(path)
        what = describe_path(path)
        if what != "a probe-engine store":
            raise StoreError(
                f"{self.path} is not a probe-engine store ({what or 'nothing is there'}); "
                f"build one with engine.build_store(model, data, path={self.path!r})"
            )
        self._zstore = _zarr_store(path, read_only=read_only)
        self.group = zarr.open_group(self._zstore, mode="r" if read_only else "r+")
        self.meta: dict = dict(self.group.attrs[ATTR])
        version = self.meta.get("format")
        if version != FORMAT_VERSION:
            raise StoreError(
                f"{self.path} has store format {version!r}; this probe-engine reads format "
                f"{FORMAT_VERSION}. Upgrade probe-engine, or rebuild the store."
            )

    # -- metadata ------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        """Layer keys in network order (``"input"``, module names, ``"<module>:input"``)."""
        return [layer["name"] for layer in self.meta["layers"]]

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def layer_info(self, layer: str) -> dict:
        """{name, module, site, call, shape, dim, reduction} of one layer."""
        for info in self.meta["layers"]:
            if info["name"] == layer:
                return dict(info)
        raise LayerNotFoundError(
            f"layer {layer!r} is not in the store {self.path}; "
            f"it has {_closest(layer, self.layers)}"
        )

    def rows(self, split: str) -> int:
        return int(self._split(split)["rows"])

    def committed(self, split: str) -> int:
        """Rows of ``split`` whose every array is written (a prefix of the split)."""
        return int(self._split(split)["rows_committed"])

    @property
    def complete(self) -> bool:
        return all(s["rows_committed"] == s["rows"] for s in self.meta["splits"].values())

    @property
    def dtype(self) -> str:
        return self.meta["config"]["dtype"]

    def _split(self, split: str) -> dict:
        try:
            return self.meta["splits"][split]
        except KeyError:
            raise SplitNotFoundError(
                f"split {split!r} is not in the store {self.path}; it has {self.splits}"
            ) from None

    # -- arrays --------------------------------------------------------------------------
    def features(self, split: str, layer: str) -> zarr.Array:
        """The (N, D) zarr array of ``layer`` on ``split`` (bfloat16 stores: uint16 bits)."""
        self._split(split)
        self.layer_info(layer)
        return self.group[f"{split}/features/{layer}"]

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
        return self._read(self.group[f"{split}/labels/{name}"], 0, stop)

    def index(self, split: str) -> np.ndarray:
        """(N,) int64: row -> index in the split's source dataset."""
        self._split(split)
        return self._read(self.group[f"{split}/index"], 0, self.rows(split))

    def num_classes(self, name: str = "y") -> int | None:
        arr = self.group[f"{self.splits[0]}/labels/{name}"]
        n = arr.attrs.get("num_classes")
        return None if n is None else int(n)

    def reduction_indices(self, layer: str) -> np.ndarray | None:
        """Flat feature indices a subsample reduction kept, or None."""
        if not self.layer_info(layer)["reduction"].startswith("subsample:"):
            return None
        return self.group[f"reductions/{layer}/indices"][:]

    def read(self, split: str, layer: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of ``layer`` as numpy (float16 / float32; bfloat16 -> float32).

        Only committed rows can be read. A chunk that fails its checksum raises
        :class:`StoreCorruptedError` naming the array and chunk.
        """
        arr = self.features(split, layer)
        committed = self.committed(split)
        stop = committed if stop is None else stop
        if not 0 <= start <= stop <= committed:
            raise ValueError(
                f"rows [{start}, {stop}) of {split}/{layer} are out of the committed range "
                f"[0, {committed}) of {self.path}"
                + ("" if self.complete else "; the build is incomplete: resume it first")
            )
        out = self._read(arr, start, stop)
        return bf16_bits_to_float32(out) if self.dtype == "bfloat16" else out

    def dask(self, split: str, layer: str):
        """Committed rows of ``layer`` on ``split`` as a dask array, a dask chunk per zarr
        chunk (bfloat16 stores: decoded to float32)."""
        import dask.array as da

        arr = da.from_zarr(self.features(split, layer))[: self.committed(split)]
        if self.dtype == "bfloat16":
            arr = arr.map_blocks(bf16_bits_to_float32, dtype=np.float32)
        return arr

    def _read(self, arr: zarr.Array, start: int, stop: int, committed: int | None = None
              ) -> np.ndarray:
        """Rows [start, stop) of ``arr``; a chunk of the committed rows that is missing (it
        would read as fill values) or fails to decode raises StoreCorruptedError."""
        split = arr.path.split("/", 1)[0]
        committed = self.committed(split) if committed is None else committed
        self._check_present(arr, start, min(stop, committed))
        try:
            return arr[start:stop]
        except (ValueError, RuntimeError, OSError) as exc:
            bad = list(self._bad_chunks(arr, start, stop))
            if not bad:
                raise
            raise StoreCorruptedError(
                f"{self.path}: array {arr.path!r} has unreadable chunk(s) {bad} ({exc}); "
                f"run `probe-engine verify {self.path}` to list every problem, then rewrite "
                f"them with build_store(model, data, {self.path!r}, resume=True, repair=True)"
            ) from exc

    def _check_present(self, arr: zarr.Array, start: int, stop: int) -> None:
        from zarr.core.sync import sync

        if stop <= start:
            return
        step = arr.chunks[0]
        keys = [_chunk_key(arr, c) for c in range(start // step, math.ceil(stop / step))]

        async def absent() -> list[str]:  # concurrent: one round trip on object stores
            found = await asyncio.gather(*(self._zstore.exists(k) for k in keys))
            return [k for k, ok in zip(keys, found, strict=True) if not ok]

        missing = sync(absent())
        if missing:
            raise StoreCorruptedError(
                f"{self.path}: array {arr.path!r} is missing chunk(s) {missing} of committed "
                f"rows (they would read as fill values); run `probe-engine verify "
                f"{self.path}` to list every problem, then rewrite them with "
                f"build_store(model, data, {self.path!r}, resume=True, repair=True)")

    def _bad_chunks(self, arr: zarr.Array, start: int, stop: int) -> Iterator[str]:
        step = arr.chunks[0]
        for c in range(start // step, math.ceil(stop / step)):
            try:
                arr[c * step : min((c + 1) * step, arr.shape[0])]
            except (ValueError, RuntimeError, OSError):
                yield _chunk_key(arr, c)

    def add_labels(self, name: str, labels, *, num_classes: int | None = None,
                   overwrite: bool = False) -> None:
        """Add a label array ``name`` to every split, beside ``y``, without a new capture:
        another objective for the same features (the paper's section 3.6).

        Args:
            labels: ``callable(y) -> labels`` applied to each split's ``y`` (e.g.
                ``lambda y: COARSE[y]``), or ``{split: (N,) ints}`` for every split.
            num_classes: recorded like ``y``'s (default: the largest label + 1).
            overwrite: replace an existing label array of that name (never ``y``).
        """
        from ._data import check_name

        if name == "y":
            raise InvalidArgumentError("label name 'y' is the dataset's own targets; give a "
                                       "name other than 'y'")
        check_name(name, "label name")
        if not writable(self.path)[0]:
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
            if v.shape != y.shape or not np.issubdtype(v.dtype, np.integer) or (
                    v.size and v.min() < 0):
                raise DataError(f"labels {name!r} of split {split!r}: need {y.shape[0]} "
                                f"non-negative integers, got shape {v.shape} {v.dtype}")
            values[split] = v.astype(np.int64)
        if name in self.label_names() and not overwrite:
            raise StoreExistsError(f"label {name!r} is already in {self.path}; pass "
                                   f"overwrite=True to replace it")
        top = max((int(v.max()) for v in values.values() if v.size), default=-1)
        n_classes = int(num_classes) if num_classes is not None else top + 1
        if top >= n_classes:
            raise DataError(f"labels {name!r} reach {top}, beyond num_classes={n_classes}")
        group = zarr.open_group(_zarr_store(self.path, read_only=False), mode="r+")
        codecs = compressors(self.meta["config"].get("compressor", "lz4"))
        for split, v in values.items():
            arr = group.create_array(
                f"{split}/labels/{name}", shape=v.shape, dtype="int64",
                chunks=(self.meta["config"]["block_rows"],), fill_value=-1,
                dimension_names=("row",), attributes={"num_classes": n_classes},
                compressors=codecs, overwrite=True)
            arr.with_config({"write_empty_chunks": True})[:] = v

    def results(self, run: str = "default"):
        """The probes and metrics of a saved solve ``run`` (:func:`engine.load_results`)."""
        from .results import load_results

        return load_results(self, run)

    # -- checks --------------------------------------------------------------------------
    def verify(self) -> VerifyReport:
        """Check metadata, every committed chunk's presence and checksum, row counts (every
        layer and label array has its split's rows), and that each committed row is a
        distinct dataset item: no item twice in a split, nor in two splits drawn from one
        source (train and its carved-out valid)."""
        report = VerifyReport(self.path)
        problems = report.problems
        for key in ("format", "model", "dataset", "layers", "splits", "config"):
            if key not in self.meta:
                problems.append(f"metadata: attrs.{ATTR}.{key} is missing")
        if problems:
            return report
        storage_dtype = DTYPES[self.dtype][0]
        for split, info in self.meta["splits"].items():
            rows, committed = info["rows"], info["rows_committed"]
            if not 0 <= committed <= rows:
                problems.append(f"{split}: rows_committed={committed} is outside [0, {rows}]")
                continue
            arrays: list[tuple[str, int | None, np.dtype]] = [
                (f"{split}/features/{layer['name']}", layer["dim"], storage_dtype)
                for layer in self.meta["layers"]
            ]
            arrays.append((f"{split}/index", None, np.dtype("int64")))
            try:
                label_names = self.label_names(split)
            except KeyError:
                label_names = []
                problems.append(f"{split}/labels: group is missing")
            for name in self.meta["config"].get("labels", ["y"]):
                if name not in label_names:
                    problems.append(f"{split}/labels/{name}: array is missing")
            arrays += [(f"{split}/labels/{n}", None, np.dtype("int64")) for n in label_names]
            for name, dim, dtype in arrays:
                self._verify_array(report, name, rows, committed, dim, dtype)
        self._verify_rows(report)
        for layer in self.meta["layers"]:
            if layer["reduction"].startswith("subsample:"):
                k = int(layer["reduction"].split(":")[1])
                self._verify_array(report, f"reductions/{layer['name']}/indices", k, k, None,
                                   np.dtype("int64"))
        return report

    def _verify_rows(self, report: VerifyReport) -> None:
        seen: dict[str, tuple[str, np.ndarray]] = {}  # source -> (split, items so far)
        sources = self.meta["dataset"].get("splits", {})
        for split, info in self.meta["splits"].items():
            name = f"{split}/index"
            if any(a == name for a, _ in report.bad_chunks) or not (
                    0 <= info["rows_committed"] <= info["rows"]):
                continue  # already reported
            try:
                items = self.group[name][: info["rows_committed"]]
            except (KeyError, ValueError, RuntimeError, OSError):
                continue  # reported by _verify_array
            if len(items) and int(items.min()) < 0:
                report.problems.append(f"{name}: row {int(np.argmax(items < 0))} points at "
                                       f"dataset item {int(items.min())}, which is negative")
            values, counts = np.unique(items, return_counts=True)
            if (counts > 1).any():
                twice = values[counts > 1]
                report.problems.append(f"{name}: {len(twice)} dataset item(s) stored more than "
                                       f"once, e.g. item {int(twice[0])}")
            source = sources.get(split, {}).get("source", split)
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
        present = set(_chunk_keys_present(self._zstore, name))
        for c in range(math.ceil(committed / step)):
            key = _chunk_key(arr, c)
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
            f"probe-engine store {self.path} (format {m['format']}, {m['config']['dtype']})",
            f"model: {m['model'].get('class')} ({m['model'].get('parameters', '?')} parameters)",
            "splits: " + ", ".join(
                f"{s} {i['rows_committed']}/{i['rows']} rows" for s, i in m["splits"].items()
            ),
            f"labels: {', '.join(self.label_names())} (classes: {self.num_classes()})",
            f"{'layer':<32} {'shape':<18} {'dim':>8}  reduction",
        ]
        for layer in m["layers"]:
            shape = "x".join(str(s) for s in layer["shape"])
            lines.append(f"{layer['name']:<32} {shape:<18} {layer['dim']:>8}  {layer['reduction']}")
        if is_local(self.path):
            size = sum(f.stat().st_size for f in Path(self.path).rglob("*") if f.is_file())
            lines.append(f"on disk: {size / 2**20:.1f} MiB")
        lines.append("complete" if self.complete else "INCOMPLETE: resume the build to finish it")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Store({self.path!r}, splits={self.splits}, layers={len(self.layers)}, "
                f"complete={self.complete})")


def _chunk_key(arr: zarr.Array, c: int) -> str:
    """The store key of row-chunk ``c`` of a row-chunked array (default v3 encoding)."""
    rest = "/0" * (len(arr.shape) - 1)
    return f"{arr.path}/c/{c}{rest}"


def _chunk_keys_present(zstore, name: str) -> Iterator[str]:
    from zarr.core.sync import sync

    async def collect() -> list[str]:
        return [k async for k in zstore.list_prefix(f"{name}/c/")]

    yield from sync(collect())


def open_store(path: str | os.PathLike) -> Store:
    """Open an existing store read-only."""
    return Store(path)

