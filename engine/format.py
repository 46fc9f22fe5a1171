"""The store format, version 1: the one owner of a store's layout (docs/store-format.md).

Everything that names a path inside a store, reads or writes its root metadata, creates one
of its arrays, or reads or writes its ``probes/`` subtree goes through this module::

    <root>/zarr.json                      attrs["probe_engine"]: StoreMeta
    <root>/<split>/features/<layer>       (N, D) float16 | float32 | uint16 (bfloat16 bits)
    <root>/<split>/labels/<name>          (N,) int64, attrs {num_classes}
    <root>/<split>/index                  (N,) int64: row -> item of the split's source
    <root>/reductions/<layer>/indices     (K,) int64, for subsample:K reductions
    <root>/probes/<run>/                  attrs["probe_engine"]: {config, fingerprint}
    <root>/probes/<run>/<layer>/{W, b}    (D, C), (C,) float32; attrs["probe_engine"]: record

Every array but the probes' is row-chunked, compressed with Blosc and checksummed with
crc32c. A block of rows counts only once the root metadata's ``rows_committed`` has moved
past it, which is the last write of the block.
"""

from __future__ import annotations

import glob
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from . import _zarr
from .errors import (
    InvalidArgumentError,
    RunNotFoundError,
    StoreCorruptedError,
    StoreError,
    StoreMismatchError,
)

__all__ = ["FORMAT_VERSION", "ATTR", "DTYPES", "COMPRESSORS", "MAX_CHUNK_BYTES", "ROOT_FOLDERS",
           "LayerMeta", "SplitMeta", "SourceMeta", "DatasetMeta", "ModelMeta", "StoreConfig",
           "StoreMeta", "check_version", "name_problem", "check_name", "features_path",
           "labels_path", "index_path", "position_path", "indices_path", "split_of",
           "chunk_key", "chunk_prefix",
           "compressors", "chunk_rows", "block_rows_for", "bf16_bits_to_float32", "open_root",
           "create_root", "read_meta", "write_meta", "ensure_arrays", "write_label_array",
           "infer_num_classes", "run_fingerprint", "start_run", "save_probe", "saved_probes",
           "run_config", "run_names", "json_safe", "from_json_safe", "describe_path",
           "remove_store", "is_local", "writable"]

FORMAT_VERSION = 1
#: the key of probe-engine's attributes in a group's zarr.json
ATTR = "probe_engine"

#: Storage dtypes: name -> (numpy dtype on disk, fill value on disk). zarr-python has no
#: bfloat16 type, so bfloat16 features are stored as their raw uint16 bits (NaN = 0x7FC0).
DTYPES: dict[str, tuple[np.dtype, Any]] = {
    "float16": (np.dtype("float16"), float("nan")),
    "float32": (np.dtype("float32"), float("nan")),
    "bfloat16": (np.dtype("uint16"), 0x7FC0),
}

#: Largest chunk written (bytes, uncompressed); the docs promise about 1-16 MB.
MAX_CHUNK_BYTES = 16 << 20

#: compressor name -> Blosc settings. Activations compress little (1.1-1.7x with lz4), so the
#: default favours speed (benchmarks/RESULTS.md, "Capture"); "zstd" with bit shuffle trades
#: CPU for smaller stores.
COMPRESSORS = {
    "lz4": {"cname": "lz4", "clevel": 1, "shuffle": "noshuffle"},
    "zstd": {"cname": "zstd", "clevel": 3, "shuffle": "bitshuffle"},
}

#: folders at the root of a store, so no split may have these names
ROOT_FOLDERS = ("probes", "reductions")
#: names zarr keeps for its own files
_RESERVED = {"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"}


# -- names -------------------------------------------------------------------------------
def name_problem(name: Any) -> str | None:
    """Why ``name`` cannot name a folder inside a store (a split, layer, label or run), or
    None when it can: a non-empty string, no path separator, no control character, not
    ``.`` / ``..``, no leading ``__`` or ``.`` (zarr's and probe-engine's own files)."""
    if not isinstance(name, str):
        return f"it is a {type(name).__name__}, not a string"
    if not name:
        return "it is empty"
    if "/" in name or "\\" in name:
        return "it holds a path separator ('/' or '\\'), which would reach outside its folder"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "it holds a control character (NUL, newline, ...)"
    if name.startswith((".", "__")):
        return "it starts with '.' or '__', which the store keeps for its own files"
    if name in _RESERVED:
        return "zarr keeps that name for its own files"
    return None


def check_name(name: Any, what: str, error: type[Exception] = InvalidArgumentError) -> str:
    """``name`` if it can name a folder inside a store, else ``error`` naming it and why."""
    problem = name_problem(name)
    if problem is not None:
        raise error(f"{what} {name!r} cannot name a folder inside the store: {problem}; "
                    f"choose a plain name such as 'coarse' or 'layer1'")
    return name


# -- paths -------------------------------------------------------------------------------
def features_path(split: str, layer: str) -> str:
    return f"{split}/features/{layer}"


def labels_path(split: str, name: str = "y") -> str:
    return f"{split}/labels/{name}"


def index_path(split: str) -> str:
    return f"{split}/index"


def position_path(split: str) -> str:
    """Token rows only: each row's position in its sequence."""
    return f"{split}/position"


def indices_path(layer: str) -> str:
    return f"reductions/{layer}/indices"


def split_of(array_path: str) -> str:
    """The split an array of a split belongs to (its first path component)."""
    return array_path.split("/", 1)[0]


def chunk_key(array_path: str, c: int, ndim: int) -> str:
    """The key of row-chunk ``c`` of a row-chunked array (the default v3 encoding, ``/``)."""
    return f"{array_path}/c/{c}" + "/0" * (ndim - 1)


def chunk_prefix(array_path: str) -> str:
    return f"{array_path}/c/"


# -- codecs and chunking -----------------------------------------------------------------
def compressors(name: str = "lz4") -> list:
    """Blosc then crc32c, so that any flipped byte fails the read."""
    if name not in COMPRESSORS:
        raise InvalidArgumentError(f"compressor must be one of {sorted(COMPRESSORS)}, not "
                                   f"{name!r}")
    return [BloscCodec(**COMPRESSORS[name]), Crc32cCodec()]


def chunk_rows(block_rows: int, row_bytes: int) -> int:
    """Rows per chunk for an array whose rows are ``row_bytes`` long: the largest divisor of
    ``block_rows`` whose chunk stays under :data:`MAX_CHUNK_BYTES`, so that a block is always
    a whole number of chunks."""
    for m in range(1, block_rows + 1):
        if block_rows % m == 0 and (block_rows // m) * row_bytes <= MAX_CHUNK_BYTES:
            return block_rows // m
    return 1


def block_rows_for(row_bytes: int, batch_size: int, block_bytes: int, most_rows: int) -> int:
    """Rows of one block (the commit unit): whole batches filling about ``block_bytes`` of
    feature rows, no more than the largest split needs, and few enough that an int64 label
    chunk (one per block) stays under :data:`MAX_CHUNK_BYTES`."""
    batches = max(1, block_bytes // max(1, row_bytes * batch_size))
    label_cap = max(1, (MAX_CHUNK_BYTES // 8) // batch_size)
    return batch_size * min(batches, -(-most_rows // batch_size), label_cap)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 values (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


# -- the root metadata -------------------------------------------------------------------
class _Reader:
    """Reads one JSON object of the metadata, naming the key that is missing or malformed."""

    def __init__(self, obj: Any, where: str, path: str):
        if not isinstance(obj, dict):
            raise StoreCorruptedError(f"{path}: metadata {where} is a {type(obj).__name__}, "
                                      f"not an object; rebuild the store with overwrite=True")
        self.obj, self.where, self.path = obj, where, path

    def __call__(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.obj:
            if default is not ...:
                return default
            raise StoreCorruptedError(f"{self.path}: metadata {self.where}.{key} is missing; "
                                      f"rebuild the store with overwrite=True")
        value = self.obj[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise StoreCorruptedError(f"{self.path}: metadata {self.where}.{key} is "
                                      f"{value!r}, not of the expected type; rebuild the "
                                      f"store with overwrite=True")
        return value

    def child(self, key: str, default: Any = ...) -> _Reader:
        return _Reader(self(key, dict, default), f"{self.where}.{key}", self.path)


@dataclass
class LayerMeta:
    """One probe site: ``name`` (the layer key, also its arrays' name), the module and side
    it was captured at, the per-row activation shape, the reduction that made ``dim``, and
    the ``select``-or (int position or str key) that picked the tensor out of a structured
    output (absent: the default pick)."""

    name: str
    module: str
    site: str
    call: int
    shape: tuple[int, ...]
    dim: int
    reduction: str
    select: int | str | None = None

    @property
    def subsample(self) -> int | None:
        """K of a ``subsample:K`` reduction, else None."""
        kind, _, k = self.reduction.partition(":")
        return int(k) if kind == "subsample" else None

    def to_json(self) -> dict:
        out = {"name": self.name, "module": self.module, "site": self.site, "call": self.call,
               "shape": list(self.shape), "dim": self.dim, "reduction": self.reduction}
        if self.select is not None:
            out["select"] = self.select
        return out

    @classmethod
    def from_json(cls, r: _Reader) -> LayerMeta:
        return cls(r("name", str), r("module", str), r("site", str), r("call", int),
                   tuple(r("shape", list)), r("dim", int), r("reduction", str),
                   r("select", (int, str), None))


@dataclass
class SplitMeta:
    """Rows of a split, the committed prefix, and the largest committed ``y``."""

    rows: int
    rows_committed: int = 0
    max_label: int | None = None  # absent until the first commit

    def to_json(self) -> dict:
        out = {"rows": self.rows, "rows_committed": self.rows_committed}
        if self.max_label is not None:
            out["max_label"] = self.max_label
        return out

    @classmethod
    def from_json(cls, r: _Reader) -> SplitMeta:
        return cls(r("rows", int), r("rows_committed", int), r("max_label", int, None))


@dataclass
class SourceMeta:
    """Where a split's rows come from: the caller's split, its rows, a digest of a few."""

    source: str
    rows: int
    digest: str

    def to_json(self) -> dict:
        return {"source": self.source, "rows": self.rows, "digest": self.digest}

    @classmethod
    def from_json(cls, r: _Reader) -> SourceMeta:
        return cls(r("source", str), r("rows", int), r("digest", str))


@dataclass
class DatasetMeta:
    type: str
    split_seed: int
    splits: dict[str, SourceMeta]
    num_classes: int | None = None
    classes: list[str] | None = None

    def to_json(self) -> dict:
        return {"type": self.type, "split_seed": self.split_seed,
                "splits": {s: v.to_json() for s, v in self.splits.items()},
                "num_classes": self.num_classes, "classes": self.classes}

    @classmethod
    def from_json(cls, r: _Reader) -> DatasetMeta:
        splits = r.child("splits")
        return cls(r("type", str), r("split_seed", int),
                   {s: SourceMeta.from_json(splits.child(s)) for s in splits.obj},
                   r("num_classes", (int, type(None)), None),
                   r("classes", (list, type(None)), None))


@dataclass
class ModelMeta:
    """The model's fingerprint (``engine._fingerprint.model_fingerprint``)."""

    cls: str
    parameters: int
    digest: str

    def to_json(self) -> dict:
        return {"class": self.cls, "parameters": self.parameters, "digest": self.digest}

    @classmethod
    def from_json(cls, r: _Reader) -> ModelMeta:
        return cls(r("class", str), r("parameters", int), r("digest", str))


@dataclass
class StoreConfig:
    """How the features were captured: what a resumed build must repeat exactly."""

    dtype: str
    batch_size: int
    seed: int
    valid_size: int | float | str
    max_features: int
    autocast: str | None
    channels_last: bool
    compressor: str
    sites: tuple[str, ...]
    block_rows: int  # the commit unit: a multiple of every chunk's rows (and, of items, of
    # batch_size)
    labels: tuple[str, ...] = ("y",)  # "y", then the extra label sets, sorted
    rows: str = "items"  # what a row is: a dataset item, or one token of a sequence

    def to_json(self) -> dict:
        out = {"dtype": self.dtype, "batch_size": self.batch_size, "seed": self.seed,
               "valid_size": self.valid_size, "max_features": self.max_features,
               "autocast": self.autocast, "channels_last": self.channels_last,
               "compressor": self.compressor, "sites": list(self.sites),
               "block_rows": self.block_rows, "labels": list(self.labels)}
        if self.rows != "items":  # stores of items read as they always did
            out["rows"] = self.rows
        return out

    @classmethod
    def from_json(cls, r: _Reader) -> StoreConfig:
        dtype = r("dtype", str)
        if dtype not in DTYPES:
            raise StoreCorruptedError(f"{r.path}: metadata config.dtype is {dtype!r}, not one "
                                      f"of {sorted(DTYPES)}; rebuild the store")
        return cls(dtype, r("batch_size", int), r("seed", int),
                   r("valid_size", (int, float, str)), r("max_features", int),
                   r("autocast", (str, type(None))), r("channels_last", bool),
                   r("compressor", str, "lz4"), tuple(r("sites", list)),
                   r("block_rows", int), tuple(r("labels", list, ["y"])),
                   r("rows", str, "items"))


@dataclass
class StoreMeta:
    """The root metadata of a store, ``attrs["probe_engine"]`` of its ``zarr.json``."""

    model: ModelMeta
    dataset: DatasetMeta
    layers: list[LayerMeta]
    splits: dict[str, SplitMeta]
    config: StoreConfig
    format: int = FORMAT_VERSION

    #: the parts a resumed build must find unchanged
    IDENTITY = ("model", "dataset", "layers", "config")

    def to_json(self) -> dict:
        return {"format": self.format, "model": self.model.to_json(),
                "dataset": self.dataset.to_json(),
                "layers": [layer.to_json() for layer in self.layers],
                "splits": {s: v.to_json() for s, v in self.splits.items()},
                "config": self.config.to_json()}

    @classmethod
    def from_json(cls, obj: Any, path: str) -> StoreMeta:
        """Parse the metadata of the store at ``path``; a format other than
        :data:`FORMAT_VERSION` or a missing or malformed key raises a :class:`StoreError`
        naming it."""
        r = _Reader(obj, f"attrs.{ATTR}", path)
        check_version(r.obj, path)
        layers = r("layers", list)
        splits = r.child("splits")
        return cls(ModelMeta.from_json(r.child("model")),
                   DatasetMeta.from_json(r.child("dataset")),
                   [LayerMeta.from_json(_Reader(x, f"{r.where}.layers[{i}]", path))
                    for i, x in enumerate(layers)],
                   {s: SplitMeta.from_json(splits.child(s)) for s in splits.obj},
                   StoreConfig.from_json(r.child("config")))

    def identity(self) -> dict:
        """The JSON of the parts a resume compares (:data:`IDENTITY`)."""
        whole = self.to_json()
        return {k: whole[k] for k in self.IDENTITY}

    @property
    def complete(self) -> bool:
        return all(s.rows_committed == s.rows for s in self.splits.values())

    def layer(self, name: str) -> LayerMeta | None:
        return next((layer for layer in self.layers if layer.name == name), None)


def check_version(obj: dict, path: str, *, resume: bool = False) -> None:
    """Refuse a root metadata object of another format version than :data:`FORMAT_VERSION`
    (``resume``: the advice of a build that would resume it)."""
    version = obj.get("format")
    if version == FORMAT_VERSION:
        return
    newer = isinstance(version, int) and version > FORMAT_VERSION
    if resume:
        raise StoreError(f"{path} has store format {version!r}; this probe-engine writes "
                         f"format {FORMAT_VERSION}; "
                         f"{'upgrade probe-engine to resume it, or ' if newer else ''}"
                         f"use another path")
    advice = "Upgrade probe-engine, or rebuild" if newer else "Rebuild"
    raise StoreError(f"{path} has store format {version!r}; this probe-engine reads format "
                     f"{FORMAT_VERSION}. {advice} the store.")


# -- opening and creating ----------------------------------------------------------------
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


def open_root(path: str | os.PathLike, *, write: bool = False) -> zarr.Group:
    """The root group of the store at ``path``, read-only unless ``write``."""
    zstore = _zarr.open_zarr_store(path, read_only=not write)
    return zarr.open_group(zstore, mode="r+" if write else "r")


def read_meta(group: zarr.Group, path: str) -> StoreMeta:
    if ATTR not in group.attrs:
        raise StoreError(f"{path} is a zarr group without probe-engine metadata; build a "
                         f"store with engine.build_store(model, data, path={path!r})")
    return StoreMeta.from_json(dict(group.attrs[ATTR]), path)


def write_meta(group: zarr.Group, meta: StoreMeta) -> None:
    """Replace the root metadata: one key, written aside and renamed (atomic)."""
    group.attrs.update({ATTR: meta.to_json()})


def create_root(path: str, meta: StoreMeta) -> zarr.Group:
    """The root group and its metadata (nothing committed), written before any array so that
    an interrupted creation is itself resumable."""
    try:
        return zarr.open_group(_zarr.open_zarr_store(path, read_only=False), mode="w-",
                               attributes={ATTR: meta.to_json()})
    except OSError as exc:
        raise StoreError(f"cannot create the store at {path}: {exc}; choose a writable "
                         f"path") from exc


def describe_path(path: str | os.PathLike) -> str | None:
    """None when ``path`` is free for a new store (absent, an empty folder, or one holding
    only the temporary files of a creation that was killed), else what is there
    ("a probe-engine store", "a file", ...)."""
    if not is_local(path):
        try:
            group = open_root(path)
        except (FileNotFoundError, _zarr.GroupNotFoundError):
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
            _zarr.TEMP_FILE.search(f.name) for f in p.rglob("*") if not f.is_dir()):
        return None  # killed while writing its very first key
    if not meta.exists():
        return "a folder that is not a zarr store"
    try:
        group = open_root(p)
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
        _zarr.delete_all(_zarr.open_zarr_store(path, read_only=False))


# -- arrays ------------------------------------------------------------------------------
def _ensure_group(group: zarr.Group, name: str) -> None:
    if not _zarr.exists(group.store, f"{name}/zarr.json"):
        try:
            zarr.open_group(group.store, path=name, mode="a")
        except OSError as exc:
            raise StoreError(f"cannot create group {name!r} in {group.store}: {exc}") from exc


def ensure_arrays(group: zarr.Group, meta: StoreMeta, indices: dict[str, np.ndarray], *,
                  repair: bool = False) -> None:
    """Create every array ``meta`` names that is not there yet (all of them for a new store,
    the rest after an interrupted creation); existing ones are checked, not touched, except a
    whole-array constant (subsample ``indices``, layer -> (K,) int64) whose chunk a kill left
    unwritten, or (``repair``) that no longer decodes."""
    # parents before children: zarr writes an array's metadata before its parent groups',
    # so a kill in between would leave a folder without metadata (which zarr warns about)
    parents = [p for split in meta.splits for p in (split, f"{split}/features",
                                                   f"{split}/labels")]
    if indices:
        parents += ["reductions", *(f"reductions/{k}" for k in indices)]
    for name in parents:
        _ensure_group(group, name)
    existing = {name for name, node in group.members(max_depth=None)
                if isinstance(node, zarr.Array)}
    codecs = compressors(meta.config.compressor)

    def create(name: str, data=None, **kw) -> None:
        if name in existing:
            _check_existing(group, name, kw["shape"], data, repair)
            return
        try:
            arr = group.create_array(name, compressors=codecs, **kw)
            if data is not None:
                arr[:] = data
        except OSError as exc:
            raise StoreError(f"cannot create array {name!r} in {group.store}: {exc}") from exc

    disk_dtype, fill = DTYPES[meta.config.dtype]
    block_rows = meta.config.block_rows
    for split, info in meta.splits.items():
        n = info.rows
        for layer in meta.layers:
            rows = chunk_rows(block_rows, layer.dim * disk_dtype.itemsize)
            create(features_path(split, layer.name), shape=(n, layer.dim), dtype=disk_dtype,
                   chunks=(rows, layer.dim), fill_value=fill,
                   dimension_names=("row", f"{layer.name}.feature"),
                   attributes={"layer": layer.name, "reduction": layer.reduction,
                               "storage_dtype": meta.config.dtype})
        for label in meta.config.labels:
            attrs = {"num_classes": meta.dataset.num_classes} if label == "y" else {}
            create(labels_path(split, label), shape=(n,), dtype="int64", chunks=(block_rows,),
                   fill_value=-1, dimension_names=("row",), attributes=attrs)
        create(index_path(split), shape=(n,), dtype="int64", chunks=(block_rows,),
               fill_value=-1, dimension_names=("row",))
        if meta.config.rows == "tokens":
            create(position_path(split), shape=(n,), dtype="int64", chunks=(block_rows,),
                   fill_value=-1, dimension_names=("row",))
    for layer in meta.layers:
        if layer.name in indices:
            idx = indices[layer.name]
            create(indices_path(layer.name), idx, shape=idx.shape, dtype="int64",
                   chunks=idx.shape, fill_value=-1, dimension_names=(f"{layer.name}.feature",),
                   attributes={"in_shape": list(layer.shape)})


def _check_existing(group: zarr.Group, name: str, shape: tuple, data, repair: bool) -> None:
    arr = group[name]
    if arr.shape != shape:
        raise StoreError(f"{group.store}: array {name!r} has shape {arr.shape}, not {shape} "
                         f"as the store's metadata says; rebuild with overwrite=True")
    if data is None:
        return
    try:
        stored = arr[:]
    except (ValueError, RuntimeError, OSError) as exc:
        if not repair:
            raise StoreCorruptedError(
                f"{group.store}: chunk {chunk_key(name, 0, arr.ndim)} does not decode ({exc}); "
                f"rerun with resume=True, repair=True to rewrite it") from exc
        stored = np.full(arr.shape, -1)
    if (stored == -1).all():  # never written (a kill) or unreadable (repair)
        arr.with_config({"write_empty_chunks": True})[:] = data
    elif not (stored == data).all():
        raise StoreError(f"{group.store}: array {name!r} does not match the store's "
                         f"metadata; rebuild with overwrite=True")


def write_label_array(group: zarr.Group, meta: StoreMeta, split: str, name: str,
                      values: np.ndarray, num_classes: int) -> None:
    """Write (or replace) the whole label array ``name`` of ``split``: row-chunked like
    ``y``, every chunk written, ``num_classes`` in its attributes; (N,) class indices, or
    (N, C) 0 / 1 for a multi-label set."""
    multi = values.ndim == 2
    arr = group.create_array(
        labels_path(split, name), shape=values.shape, dtype="int64",
        chunks=(meta.config.block_rows, *values.shape[1:]), fill_value=-1,
        dimension_names=("row", "class") if multi else ("row",),
        attributes={"num_classes": num_classes},
        compressors=compressors(meta.config.compressor), overwrite=True)
    arr.with_config({"write_empty_chunks": True})[:] = values


def infer_num_classes(group: zarr.Group, meta: StoreMeta) -> None:
    """``num_classes`` neither given nor known from the dataset: the largest committed label
    + 1, written into every split's ``labels/y`` attributes where it is not there yet."""
    n = 1 + max((-1 if s.max_label is None else s.max_label) for s in meta.splits.values())
    for split in meta.splits:
        arr = group[labels_path(split)]
        if arr.attrs.get("num_classes") != n:
            arr.attrs["num_classes"] = n


# -- probes/ -----------------------------------------------------------------------------
def _run_path(run: str) -> str:
    return f"probes/{run}"


def run_names(group: zarr.Group) -> list[str]:
    return sorted(group["probes"].group_keys()) if "probes" in group else []


def run_fingerprint(meta: StoreMeta) -> dict:
    """What a run's probes were fitted on: the model, the data and the committed rows."""
    return {"model": meta.model.digest,
            "dataset": {s: v.digest for s, v in meta.dataset.splits.items()},
            "committed": {s: v.rows_committed for s, v in meta.splits.items()}}


def _probes_group(path: str) -> zarr.Group:
    try:
        return open_root(path, write=True)
    except PermissionError as exc:
        raise StoreError(f"cannot write probes into {path}: {exc}") from exc


def start_run(path: str, meta: StoreMeta, run: str, config: dict) -> None:
    """Create ``probes/<run>`` holding ``config`` and the data's fingerprint, or check that
    an existing run holds the same (a rerun finishes it)."""
    check_name(run, "run name")
    if not writable(f"{path}/probes")[0]:  # the store itself while probes/ is absent
        raise StoreError(f"cannot write probes into {path}: the store is read-only (no write "
                         f"permission); make it writable, or solve a copy")
    root = _probes_group(path)
    wanted = json_safe({"config": config, "fingerprint": run_fingerprint(meta)})
    where = _run_path(run)
    if where in root:
        have = dict(root[where].attrs.get(ATTR, {}))
        if have != wanted:
            raise StoreMismatchError(
                f"run {run!r} in {path} was solved with another config or on other rows "
                f"({have.get('config')} vs {wanted['config']}); choose another run= name, or "
                f"delete probes/{run}")
        return
    root.create_group(where, attributes={ATTR: wanted})


def run_config(group: zarr.Group, path: str, run: str) -> dict:
    """The solver config of ``run``; :class:`RunNotFoundError` listing the runs if none."""
    check_name(run, "run name")
    if _run_path(run) not in group:
        raise RunNotFoundError(f"no run {run!r} in {path}; runs: {run_names(group)}")
    return dict(group[_run_path(run)].attrs[ATTR])["config"]


def saved_probes(group: zarr.Group, run: str) -> dict[str, dict]:
    """Records of the layers of ``run`` whose probes are completely saved: the attributes
    (NaN restored) plus ``W`` and ``b`` as numpy."""
    where = _run_path(run)
    if where not in group:
        return {}
    out = {}
    for layer in group[where].group_keys():
        g = group[f"{where}/{layer}"]
        rec = g.attrs.get(ATTR)
        if rec and rec.get("complete") and "W" in g and "b" in g:
            rec = dict(rec)
            for key in ("metrics", "grid", "mdl"):
                if key in rec:
                    rec[key] = from_json_safe(rec[key])
            out[layer] = {**rec, "W": g["W"][:], "b": g["b"][:]}
            if "outputs" in g:  # per-row outputs of valid / test (engine.metrics)
                out[layer]["outputs"] = {
                    split: {name: arr[:] for name, arr in g[f"outputs/{split}"].arrays()}
                    for split in g["outputs"].group_keys()}
    return out


def save_probe(path: str, run: str, layer: str, record: dict) -> None:
    """Write one layer's probe (``record["W"]``, ``record["b"]``, the rest as attributes);
    its ``complete`` mark goes last, so a kill in between leaves a layer a rerun solves
    again."""
    g = _probes_group(path).require_group(f"{_run_path(run)}/{layer}")
    for name in ("W", "b"):
        data = np.ascontiguousarray(record[name], dtype=np.float32)
        arr = g.create_array(name, shape=data.shape, dtype="float32", chunks=data.shape,
                             overwrite=True)
        arr[...] = data
    for split, arrays in record.get("outputs", {}).items():
        where = g.require_group(f"outputs/{split}")
        for name, data in arrays.items():
            data = np.ascontiguousarray(data)
            arr = where.create_array(name, shape=data.shape, dtype=data.dtype,
                                     chunks=data.shape, compressors=compressors(),
                                     overwrite=True)
            arr[...] = data
    attrs = {k: v for k, v in record.items() if k not in ("W", "b", "outputs")}
    g.attrs[ATTR] = json_safe({**attrs, "complete": True})


def json_safe(x: Any) -> Any:
    """JSON-safe: NaN / inf -> None (top-5 error is undefined for C <= 5), numpy scalars ->
    Python."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def from_json_safe(x: Any) -> Any:
    """Inverse of :func:`json_safe` for metric values: None -> NaN."""
    if isinstance(x, dict):
        return {k: from_json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [from_json_safe(v) for v in x]
    return float("nan") if x is None else x

