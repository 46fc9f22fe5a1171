"""``build_store``: run a frozen model over every split and stream its probe-site activations
into a feature store.

The capture loop fills blocks of rows (a multiple of the batch size, a whole number of chunks
of every array) in host buffers straight from the forward hooks; a background thread
compresses, writes and commits each block while the model runs the next. A block is
committed (``rows_committed`` advanced) only after all of its arrays are on disk, so an
interrupted build resumes at its first uncommitted block and ends with the same arrays.
"""

from __future__ import annotations

import fnmatch
import json
import os
import queue
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn
from tqdm.auto import tqdm
from zarr.core.sync import sync

from . import _lock, _zarr
from . import format as _store
from ._data import (
    SplitSource,
    check_targets,
    compute_extra,
    extra_labels,
    resolve_splits,
    sample_digest,
)
from ._devices import resolve_device
from ._fingerprint import differences, model_fingerprint
from ._writer import Block, BlockWriter
from .capture import Site, _check_sites, discover_sites, hooked, select_modules
from .errors import (
    DataError,
    InvalidArgumentError,
    NonFiniteError,
    ProbeEngineError,
    StoreCorruptedError,
    StoreError,
    StoreExistsError,
    StoreMismatchError,
)
from .format import ATTR, DTYPES, FORMAT_VERSION
from .reduce import Reduction, check_reduce, check_reduce_keys, resolve_reduction
from .store import Store

__all__ = ["build_store"]

_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
_AUTOCAST = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}



def build_store(
    model: nn.Module,
    data: Any,
    path: str | os.PathLike = "probes.zarr",
    *,
    layers: Any = "auto",
    sites: Sequence[str] | str = ("output",),
    reduce: str | Mapping[str, str] = "auto",
    max_features: int = 8192,
    dtype: str = "float16",
    labels: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    valid_size: int | float | str = "auto",
    seed: int = 0,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    autocast: str | None = None,
    channels_last: bool = False,
    block_bytes: int = 64 << 20,
    compressor: str = "lz4",
    nan_policy: str = "raise",
    resume: bool = True,
    overwrite: bool = False,
    repair: bool = False,
    progress: bool = True,
    client: Any = None,
) -> Store:
    """Capture the activations of ``layers`` of ``model`` on ``data`` into a store at ``path``.

    Args:
        model: a frozen ``nn.Module``; run in eval mode under ``torch.inference_mode``, its
            training flags, device and memory format restored afterwards.
        data: a Dataset or DataLoader of ``(input, int label)``, or a mapping of split name
            to one. A single dataset, or a mapping without ``"valid"``, gives ``valid_size``
            rows of its ``"train"`` split (seeded by ``seed``) to a ``"valid"`` split.
        layers: ``"auto"`` (the model input and every conv, linear, activation and pooling
            module), or names, globs and module types; see :func:`engine.capture.select_modules`.
        sites: ``"output"`` and/or ``"input"`` side of each selected module.
        reduce: ``"none"``, ``"pool"``, ``"pool:HxW"``, ``"subsample:K"`` or ``"auto"``
            (by ``max_features``), or a dict of layer key / module name / glob -> spec
            (unlisted layers: ``"auto"``).
        dtype: storage dtype, ``"float16"`` (default), ``"bfloat16"`` or ``"float32"``.
        labels: extra label arrays, ``{name: callable(y) -> labels or array indexed by the
            source dataset's item index}``, stored beside ``y``.
        num_classes: number of classes of ``y``; default ``len(dataset.classes)`` when the
            dataset has ``classes``, else the largest label + 1.
        batch_size: rows per forward pass (default: the DataLoader's, else 256).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:1"``, ...
        autocast: ``"bfloat16"`` / ``"float16"`` runs the forward under ``torch.autocast``.
        channels_last: run conv nets in channels-last memory format.
        block_bytes: host bytes of one block of rows (all layers); two blocks are in flight.
        nan_policy: ``"raise"`` on NaN / inf activations (naming layer and row) or ``"ignore"``.
        resume: continue an interrupted build at ``path`` made with the same model, data and
            config (anything else is refused, naming the difference). A complete store is
            returned as it is: nothing is written.
        repair: with ``resume``, first verify the committed rows (:meth:`Store.verify`) and
            rewrite exactly the chunks that are missing, truncated or fail their checksum,
            recomputing only the blocks of rows that hold them (every other file is left
            untouched); then finish the build as ``resume`` does. Problems other than
            chunks (a wrong shape, bad metadata) raise :class:`StoreCorruptedError`.
        overwrite: replace an existing store at ``path``; never deletes anything that is not
            a probe-engine store.
        client: a ``distributed.Client`` (e.g. :func:`engine.cluster`): the rows are cut into
            whole blocks, one task each, and the workers run the model on their blocks and
            write them into the store at ``path``, which all of them must reach (a shared
            filesystem). The store equals a single-process build's.

    Only one process may write a store: a second ``build_store`` on the same path while one
    runs raises :class:`StoreLockedError` naming the holder's pid and host. The lock dies
    with its process (see ``docs/reliability.md``); a Dask build holds it in the driver.

    Returns:
        The :class:`Store`, complete.
    """
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    if nan_policy not in ("raise", "ignore"):
        raise InvalidArgumentError(f"nan_policy must be 'raise' or 'ignore', not {nan_policy!r}")
    if compressor not in _store.COMPRESSORS:
        raise InvalidArgumentError(f"compressor must be one of {sorted(_store.COMPRESSORS)}, "
                                   f"not {compressor!r}")
    if autocast not in _AUTOCAST:
        raise InvalidArgumentError(f"autocast must be None, 'bfloat16' or 'float16', not "
                                   f"{autocast!r}")
    if batch_size is not None and int(batch_size) < 1:
        raise InvalidArgumentError(f"batch_size must be at least 1, not {batch_size}")
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be a torch.nn.Module, not a "
                                   f"{type(model).__name__}")
    sides = _check_sites(sites)
    check_reduce(reduce)
    path = str(path)

    splits = resolve_splits(data, valid_size=valid_size, seed=seed)
    check_targets(splits, num_classes)
    extras = extra_labels(labels, splits)
    batch_size = int(batch_size or splits[0].batch_size or 256)

    existing = _store.describe_path(path)
    if existing is not None and existing != "a probe-engine store":
        raise StoreError(f"{path} holds {existing}, not a probe-engine store; choose another "
                         f"path (nothing there was changed)")
    if existing and not overwrite and not resume:
        raise StoreExistsError(f"a store already exists at {path}; pass resume=True to finish "
                               f"or reuse it, overwrite=True to replace it, or another path")
    _check_writable(path)

    modules = select_modules(model, layers)
    run = _Runner(model, _resolve_device(model, device), autocast, channels_last)
    with _lock.hold(path), run:
        existing = _store.describe_path(path)  # again, now that no other writer can change it
        if existing and not overwrite and not resume:
            raise StoreExistsError(f"a store already exists at {path}; pass resume=True to "
                                   f"finish or reuse it, overwrite=True to replace it, or "
                                   f"another path")
        first = splits[0]
        probe = first.fetch(list(range(min(2, first.rows))))
        found = discover_sites(model, modules, sides, lambda: run.forward(probe.inputs))
        check_reduce_keys(reduce, [site for site, _ in found])
        reductions = {
            site.key: resolve_reduction(_spec_for(reduce, site), shape, key=site.key,
                                        max_features=max_features, seed=seed,
                                        strict=not isinstance(reduce, str))
            for site, shape in found
        }
        meta = _metadata(model, splits, found, reductions, extras, num_classes,
                         dtype=dtype, batch_size=batch_size, block_bytes=block_bytes, seed=seed,
                         valid_size=valid_size, max_features=max_features, autocast=autocast,
                         channels_last=channels_last, compressor=compressor, sides=sides)
        if existing and overwrite:
            _store.remove_store(path)
            existing = None
        if existing:
            group = _reopen(path, meta)  # a refusal leaves the store as it is
        # temporary files and empty folders of killed writers: only a lock holder may
        # remove them
        _zarr.remove_temp_files(path)
        if not existing:
            group = _create_root(path, meta)
        _ensure_arrays(group, meta, reductions, compressor, repair=repair)
        store_meta = dict(group.attrs[ATTR])
        capture = dict(dtype=dtype, sides=sides, batch_size=batch_size, nan_policy=nan_policy)
        sites_found = [s for s, _ in found]
        if repair and existing:
            _repair(run, path, group, store_meta, splits, sites_found, reductions, extras,
                    capture, progress=progress)
        if client is not None:
            from . import schedule

            schedule.build_on(client, path, group, store_meta, model, splits, sites_found,
                              reductions, extras, capture=capture,
                              runner=dict(device=device, autocast=autocast,
                                          channels_last=channels_last), progress=progress)
        else:
            _remove_markers(path)  # of an unfinished Dask build: its blocks are redone here
            _capture(run, group, store_meta, splits, sites_found, reductions, extras,
                     progress=progress, path=path, **capture)
        if store_meta["dataset"]["num_classes"] is None and all(
                i["rows_committed"] == i["rows"] for i in store_meta["splits"].values()):
            _infer_num_classes(group, store_meta, splits)  # writes only what is not there
    return Store(path)


# -- repair ------------------------------------------------------------------------------
def _repair(run: _Runner, path: str, group: zarr.Group, meta: dict,
            splits: list[SplitSource], sites: list[Site], reductions: dict[str, Reduction],
            extras: dict, capture: dict, *, progress: bool) -> list[tuple[str, int]]:
    """Verify the committed rows and rewrite exactly the chunks that are missing or do not
    decode, recomputing only the blocks of rows that hold them; returns those chunks."""
    report = Store(path).verify()
    if len(report.problems) > len(report.bad_chunks):  # not only chunks: not repairable here
        chunk_keys = {f"{a}/c/{c}" for a, c in report.bad_chunks}
        other = [p for p in report.problems if not any(p.startswith(k) for k in chunk_keys)]
        raise StoreCorruptedError(
            f"the store at {path} has problems a chunk repair cannot fix:\n  "
            + "\n  ".join(other[:12])
            + "\nRebuild it with overwrite=True (or build into another path)")
    if not report.bad_chunks:
        return []
    block_rows = meta["config"]["block_rows"]
    only: dict[str, set[int]] = {}
    blocks: dict[str, set[int]] = {}
    names = {s.name for s in splits}
    for array, c in report.bad_chunks:
        split = array.split("/", 1)[0]
        if split not in names:  # pragma: no cover - verify checks splits of the metadata
            raise StoreCorruptedError(f"{path}: chunk {array}/c/{c} belongs to no split")
        only.setdefault(array, set()).add(c)
        step = group[array].chunks[0]
        blocks.setdefault(split, set()).add(c * step // block_rows * block_rows)
    for split in splits:
        for b0 in sorted(blocks.get(split.name, ())):
            b1 = min(b0 + block_rows, split.rows)
            _capture(run, group, meta, splits, sites, reductions, extras, progress=progress,
                     path=path, ranges={split.name: (b0, b1)}, on_commit=lambda block: None,
                     only=only, **capture)
    still = []
    for array, chunks in only.items():
        arr, step = group[array], group[array].chunks[0]
        for c in sorted(chunks):
            try:
                arr[c * step : min((c + 1) * step, arr.shape[0])]
            except (ValueError, RuntimeError, OSError):
                still.append(f"{array}/c/{c}")
    if still:
        raise StoreCorruptedError(f"{path}: chunks {still} still do not decode after being "
                                  f"rewritten; check the disk, then rebuild with "
                                  f"overwrite=True")
    return report.bad_chunks


# -- shard-parallel capture (engine.schedule.build_on drives it) --------------------------
#: where the tasks of a Dask build mark their finished blocks; removed when the build ends
_SHARDS = ".probe-engine-shards"


def _shard_fs(path: str):
    """(fsspec filesystem, marker folder) of the store at ``path``, a path or any URL."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path))
    return fs, f"{root.rstrip('/')}/{_SHARDS}"


def _marker(path: str, split: str, start: int, stop: int) -> str:
    return f"{_shard_fs(path)[1]}/{split}/{start}-{stop}"


def _marked(path: str, split: str, start: int, stop: int) -> bool:
    return _shard_fs(path)[0].exists(_marker(path, split, start, stop))


def _remove_markers(path: str) -> None:
    fs, folder = _shard_fs(path)
    if fs.exists(folder):
        fs.rm(folder, recursive=True)


def _capture_shard(path: str, model: nn.Module, splits: list[SplitSource], sites: list[Site],
                   reductions: dict[str, Reduction], extras: dict, capture: dict,
                   runner: dict, split: str, start: int, stop: int) -> dict:
    """On a worker: capture rows [start, stop) (whole blocks) of ``split`` into the store
    at ``path``; each block is marked done only once its arrays are written."""
    group = zarr.open_group(_zarr.open_zarr_store(path, read_only=False), mode="r+")
    meta = dict(group.attrs[ATTR])
    t0 = time.perf_counter()

    fs = _shard_fs(path)[0]

    def mark(block: Block) -> None:
        from fsspec.implementations.local import LocalFileSystem

        marker = _marker(path, block.split, block.start, block.stop)
        data = json.dumps({"max_label": int(block.arrays[f"{block.split}/labels/y"].max())})
        fs.makedirs(marker.rpartition("/")[0], exist_ok=True)
        if isinstance(fs, LocalFileSystem):  # all or nothing: write aside, then rename
            fs.pipe_file(marker + ".tmp", data.encode())
            fs.mv(marker + ".tmp", marker)
        else:  # an object store's put is already all or nothing
            fs.pipe_file(marker, data.encode())

    run = _Runner(model, _resolve_device(model, runner["device"]), runner["autocast"],
                  runner["channels_last"])
    with run:
        _capture(run, group, meta, splits, sites, reductions, extras, progress=False,
                 path=path, ranges={split: (start, stop)}, on_commit=mark, **capture)
    return {"split": split, "start": start, "stop": stop, "seconds": time.perf_counter() - t0,
            "pid": os.getpid()}


def _finish_shards(path: str, group: zarr.Group, meta: dict, splits: list[SplitSource]) -> None:
    """Every block written: commit the splits in the root metadata as a single-process
    build does, then drop the markers."""
    fs, folder = _shard_fs(path)
    for s in splits:
        info = meta["splits"][s.name]
        markers = [m for m in fs.glob(f"{folder}/{s.name}/*-*") if not m.endswith(".tmp")]
        labels = [json.loads(fs.cat_file(m))["max_label"] for m in markers]
        if labels:
            info["max_label"] = max(info.get("max_label", -1), *labels)
        info["rows_committed"] = s.rows
    if meta["dataset"]["num_classes"] is None:
        _infer_num_classes(group, meta, splits)  # before the commit that says "complete"
    group.attrs.update({ATTR: meta})
    _remove_markers(path)


# -- set-up ------------------------------------------------------------------------------
def _resolve_device(model: nn.Module, device: str | torch.device) -> torch.device:
    """``"auto"``: the model's device when it is not the CPU, else CUDA when available."""
    if device == "auto":
        params = list(model.parameters())
        if params and params[0].device.type != "cpu":
            return params[0].device
    return resolve_device(device)


def _check_writable(path: str) -> None:
    ok, checked = _store.writable(path)
    if not ok:
        raise StoreError(f"cannot write to {checked} (read-only or no permission); choose a "
                         f"writable path for the store")


def _spec_for(reduce: str | Mapping[str, str], site: Site) -> str:
    if isinstance(reduce, str):
        return reduce
    if not isinstance(reduce, Mapping):
        raise ValueError(f"reduce must be a spec string or a dict, not {reduce!r}")
    for key in (site.key, site.module or "input"):
        if key in reduce:
            return reduce[key]
    for pattern, spec in reduce.items():
        if fnmatch.fnmatchcase(site.key, pattern):
            return spec
    return "auto"


def _metadata(model, splits: list[SplitSource], found, reductions: dict[str, Reduction],
              extras: dict, num_classes: int | None, **config) -> dict:
    dim_sum = sum(r.dim for r in reductions.values())
    row_bytes = dim_sum * DTYPES[config["dtype"]][0].itemsize
    batch_size = config["batch_size"]
    batches = max(1, config.pop("block_bytes") // max(1, row_bytes * batch_size))
    # no bigger than the largest split, and int64 label chunks stay under the chunk cap
    most = max(s.rows for s in splits)
    label_cap = max(1, (_store.MAX_CHUNK_BYTES // 8) // batch_size)
    batches = min(batches, -(-most // batch_size), label_cap)
    block_rows = batch_size * batches
    classes = getattr(splits[0].dataset, "classes", None)
    if num_classes is None and classes is not None:
        num_classes = len(classes)
    meta = {
        "format": FORMAT_VERSION,
        "model": model_fingerprint(model),
        "dataset": {
            "type": type(splits[0].dataset).__name__,
            "split_seed": config["seed"],
            "splits": {
                s.name: {"source": s.source, "rows": s.rows, "digest": sample_digest(s)}
                for s in splits
            },
            "num_classes": num_classes,
            "classes": list(map(str, classes)) if classes is not None else None,
        },
        "layers": [
            {"name": site.key, "module": site.module, "site": site.side, "call": site.call,
             "shape": list(shape), "dim": reductions[site.key].dim,
             "reduction": reductions[site.key].spec}
            for site, shape in found
        ],
        "splits": {s.name: {"rows": s.rows, "rows_committed": 0} for s in splits},
        "config": {**config, "sites": list(config["sides"]), "block_rows": block_rows,
                   "labels": ["y", *sorted(extras)]},
    }
    del meta["config"]["sides"]
    return json.loads(json.dumps(meta))


def _reopen(path: str, meta: dict) -> zarr.Group:
    group = zarr.open_group(_zarr.open_zarr_store(path, read_only=False), mode="r+")
    stored = dict(group.attrs[ATTR])
    if stored.get("format") != FORMAT_VERSION:
        newer = isinstance(stored.get("format"), int) and stored["format"] > FORMAT_VERSION
        raise StoreError(f"{path} has store format {stored.get('format')!r}; this "
                         f"probe-engine writes format {FORMAT_VERSION}; "
                         f"{'upgrade probe-engine to resume it, or ' if newer else ''}"
                         f"use another path")
    keys = ("model", "dataset", "layers", "config")
    diff = differences({k: stored.get(k) for k in keys}, {k: meta[k] for k in keys})
    if diff:
        raise StoreMismatchError(
            f"the store at {path} was built with another model, data or config, so it cannot "
            f"be resumed:\n  " + "\n  ".join(diff[:12])
            + ("\n  ..." if len(diff) > 12 else "")
            + "\nPass overwrite=True to rebuild it, or choose another path."
        )
    return group


def _create_root(path: str, meta: dict) -> zarr.Group:
    """The root group and its metadata (rows_committed = 0), written before any array so
    that an interrupted creation is itself resumable."""
    try:
        return zarr.open_group(_zarr.open_zarr_store(path, read_only=False), mode="w-",
                               attributes={ATTR: meta})
    except OSError as exc:
        raise StoreError(f"cannot create the store at {path}: {exc}; choose a writable "
                         f"path") from exc


def _ensure_arrays(group: zarr.Group, meta: dict, reductions: dict[str, Reduction],
                   cname: str, *, repair: bool = False) -> None:
    """Create every array the metadata names that is not there yet (all of them for a new
    store, the rest after an interrupted creation); existing ones are checked, not touched,
    except a whole-array constant (subsample indices) whose chunk a kill left unwritten, or
    (``repair``) that no longer decodes."""
    # parents before children: zarr writes an array's metadata before its parent groups',
    # so a kill in between would leave a folder without metadata (which zarr warns about)
    parents = [p for split in meta["splits"] for p in (split, f"{split}/features",
                                                       f"{split}/labels")]
    subsampled = [k for k, r in reductions.items() if r.indices is not None]
    if subsampled:
        parents += ["reductions", *(f"reductions/{k}" for k in subsampled)]
    for name in parents:
        if not sync(group.store.exists(f"{name}/zarr.json")):
            try:
                zarr.open_group(group.store, path=name, mode="a")
            except OSError as exc:
                raise StoreError(f"cannot create group {name!r} in {group.store}: {exc}") \
                    from exc
    existing = {name for name, node in group.members(max_depth=None)
                if isinstance(node, zarr.Array)}

    def create(name: str, data=None, **kw) -> None:
        if name in existing:
            arr = group[name]
            if arr.shape != kw["shape"]:
                raise StoreError(f"{group.store}: array {name!r} has shape {arr.shape}, not "
                                 f"{kw['shape']} as the store's metadata says; rebuild with "
                                 f"overwrite=True")
            if data is None:
                return
            try:
                stored = arr[:]
            except (ValueError, RuntimeError, OSError) as exc:
                if not repair:
                    raise StoreCorruptedError(
                        f"{group.store}: chunk {name}/c/0 does not decode ({exc}); rerun with "
                        f"resume=True, repair=True to rewrite it") from exc
                stored = np.full(arr.shape, -1)
            if (stored == -1).all():  # never written (a kill) or unreadable (repair)
                arr.with_config({"write_empty_chunks": True})[:] = data
            elif not (stored == data).all():
                raise StoreError(f"{group.store}: array {name!r} does not match the store's "
                                 f"metadata; rebuild with overwrite=True")
            return
        try:
            arr = group.create_array(name, compressors=codecs, **kw)
            if data is not None:
                arr[:] = data
        except OSError as exc:
            raise StoreError(f"cannot create array {name!r} in {group.store}: {exc}") from exc

    disk_dtype, fill = DTYPES[meta["config"]["dtype"]]
    block_rows = meta["config"]["block_rows"]
    codecs = _store.compressors(cname)
    for split, info in meta["splits"].items():
        n = info["rows"]
        for layer in meta["layers"]:
            dim = layer["dim"]
            rows = _store.chunk_rows(block_rows, dim * disk_dtype.itemsize)
            create(
                f"{split}/features/{layer['name']}", shape=(n, dim), dtype=disk_dtype,
                chunks=(rows, dim), fill_value=fill,
                dimension_names=("row", f"{layer['name']}.feature"),
                attributes={"layer": layer["name"], "reduction": layer["reduction"],
                            "storage_dtype": meta["config"]["dtype"]},
            )
        for label in meta["config"]["labels"]:
            attrs = {"num_classes": meta["dataset"]["num_classes"]} if label == "y" else {}
            create(f"{split}/labels/{label}", shape=(n,), dtype="int64", chunks=(block_rows,),
                   fill_value=-1, dimension_names=("row",), attributes=attrs)
        create(f"{split}/index", shape=(n,), dtype="int64", chunks=(block_rows,), fill_value=-1,
               dimension_names=("row",))
    for key, red in reductions.items():
        if red.indices is not None:
            create(f"reductions/{key}/indices", red.indices, shape=red.indices.shape,
                   dtype="int64", chunks=red.indices.shape, fill_value=-1,
                   dimension_names=(f"{key}.feature",),
                   attributes={"in_shape": list(red.in_shape)})


class _Runner:
    """Runs the model on ``device`` under inference mode, autocast and channels-last as
    asked. A model on one device is moved there and back; a model spread over several
    devices (model parallel) stays where it is and gets its inputs on ``device``."""

    def __init__(self, model: nn.Module, device: torch.device, autocast, channels_last: bool):
        self.model, self.device, self.channels_last = model, device, channels_last
        self.amp = _AUTOCAST[autocast]
        homes = {t.device for t in (*model.parameters(), *model.buffers())}
        self._home = next(iter(homes)) if len(homes) == 1 else None
        self._move = self._home is not None and self._home != device

    def __enter__(self):
        if self._move:
            self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        return self

    def __exit__(self, *exc):
        if self.channels_last:
            self.model.to(memory_format=torch.contiguous_format)
        if self._move:
            self.model.to(self._home)

    def forward(self, inputs: torch.Tensor) -> None:
        x = inputs.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        amp = (torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None
               else nullcontext())
        with torch.inference_mode(), amp:
            self.model(x)


# -- the capture loop --------------------------------------------------------------------
def _capture(run: _Runner, group: zarr.Group, meta: dict, splits: list[SplitSource],
             sites: list[Site], reductions: dict[str, Reduction], extras: dict, *, dtype: str,
             sides: tuple[str, ...], batch_size: int, nan_policy: str, progress: bool,
             path: str, ranges: dict[str, tuple[int, int]] | None = None,
             on_commit: Any = None, only: dict[str, set[int]] | None = None) -> None:
    """Capture rows [start, stop) of each split (default: from ``rows_committed`` to the
    end, committing each block in the root metadata; a shard task passes its own row range
    of whole blocks and ``on_commit``)."""
    block_rows = meta["config"]["block_rows"]
    num_classes = meta["dataset"]["num_classes"]
    if ranges is None:
        ranges = {s.name: (meta["splits"][s.name]["rows_committed"], s.rows) for s in splits}
    todo = [s for s in splits if s.name in ranges and ranges[s.name][0] < ranges[s.name][1]]
    total = sum(ranges[s.name][1] - ranges[s.name][0] for s in todo)
    if not todo:
        return
    cuda = run.device.type == "cuda"
    tdtype = _TORCH_DTYPES[dtype]
    acc = torch.float32 if tdtype == torch.float16 else torch.float64
    keys = [s.key for s in sites]
    dims = {k: reductions[k].dim for k in keys}
    label_names = ["y", *sorted(extras)]

    def new_buffers() -> dict[str, torch.Tensor]:
        bufs = {k: torch.empty((block_rows, dims[k]), dtype=tdtype, pin_memory=cuda)
                for k in keys}
        bufs.update({f"label:{n}": torch.empty(block_rows, dtype=torch.int64) for n in label_names})
        bufs["index"] = torch.empty(block_rows, dtype=torch.int64)
        return bufs

    free: queue.Queue[dict] = queue.Queue()
    for _ in range(2):
        free.put(new_buffers())

    def commit(block: Block) -> None:
        info = meta["splits"][block.split]
        info["rows_committed"] = block.stop
        info["max_label"] = max(info.get("max_label", -1),
                                int(block.arrays[f"{block.split}/labels/y"].max()))
        if num_classes is None and all(i["rows_committed"] == i["rows"]
                                       for i in meta["splits"].values()):
            # the last commit: num_classes first, so that a complete store always has it
            _infer_num_classes(group, meta, splits)
        group.attrs.update({ATTR: meta})  # atomic (a rename), and the last write of a block

    writer = BlockWriter(group, on_commit or commit, lambda b: free.put(b.buffers),
                         only=only, where=path)
    state: dict[str, Any] = {"bufs": None, "at": 0, "flags": [], "fired": 0}

    def sink(site: Site, t: torch.Tensor) -> None:
        buf = state["bufs"].get(site.key)
        if buf is None:
            raise ProbeEngineError(
                f"site {site.key!r} ran in this batch but not in the first one (data-dependent "
                f"control flow); list the layers that always run in `layers`")
        state["fired"] += 1
        out = reductions[site.key](t)
        if cuda:  # cast on the device: half the bytes cross the bus
            out = out.to(tdtype)
        a = state["at"]
        dest = buf[a : a + out.shape[0]]
        dest.copy_(out, non_blocking=True)  # copies now: later in-place ops cannot reach it
        if nan_policy == "raise":
            # a sum is finite iff every term is, as long as it cannot overflow: float16 terms
            # (< 65504) summed in float32, wider ones in float64; a fifth to a twentieth of
            # the cost of isfinite().all()
            state["flags"].append((site.key, (out if cuda else dest).sum(dtype=acc)))

    bar = tqdm(total=total, unit="row", unit_scale=True, disable=not progress,
               desc=f"build {Path(path).name}", smoothing=0.1, mininterval=0.5)
    t0 = time.perf_counter()
    try:
        with hooked(run.model, _modules_of(sites), sides, sink):
            for split in todo:
                start, stop = ranges[split.name]
                batches = split.batches(start, batch_size, pin_memory=cuda)
                for b0 in range(start, stop, block_rows):
                    b1 = min(b0 + block_rows, stop)
                    bufs = _take(free, writer)
                    state["bufs"], state["at"], state["flags"] = bufs, 0, []
                    ybuf = bufs["label:y"]
                    while state["at"] < b1 - b0:
                        inputs, y = next(batches)
                        n = len(y)
                        if num_classes is not None and n and int(y.max()) >= num_classes:
                            bad = int((y >= num_classes).nonzero()[0])
                            raise DataError(
                                f"split {split.name!r}, row {b0 + state['at'] + bad}: label "
                                f"{int(y[bad])} is out of range for {num_classes} classes; "
                                f"pass num_classes= or fix the labels")
                        state["fired"] = 0
                        try:
                            run.forward(inputs)
                        except Exception as exc:
                            r0 = b0 + state["at"]
                            exc.add_note(f"probe-engine: on split {split.name!r}, rows "
                                         f"{r0}..{r0 + n - 1} of the store {path}; rows "
                                         f"before {b0} are committed. Fix the model or data "
                                         f"and rerun build_store with resume=True to finish.")
                            raise
                        if state["fired"] != len(keys):
                            raise ProbeEngineError(
                                f"split {split.name!r}, rows {b0 + state['at']}..: "
                                f"{state['fired']} site calls in this batch, {len(keys)} in "
                                f"the first one (data-dependent control flow); list the "
                                f"layers that always run in `layers`")
                        ybuf[state["at"] : state["at"] + n].copy_(y)
                        state["at"] += n
                        bar.update(n)
                    if cuda:
                        torch.cuda.current_stream(run.device).synchronize()
                    _check_finite(state["flags"], bufs, split.name, b0, b1 - b0)
                    writer.put(_fill_block(split, bufs, b0, b1, extras, label_names, keys))
                    if writer.seconds_busy:
                        mb = writer.bytes_written / 2**20 / (time.perf_counter() - t0)
                        bar.set_postfix_str(f"{mb:.0f} MB/s written", refresh=False)
    except StopIteration:
        raise DataError(f"split {split.name!r} yielded fewer rows than its dataset's length "
                        f"({split.rows}); the dataset changed during the build") from None
    finally:
        bar.close()
        writer.close()


def _infer_num_classes(group: zarr.Group, meta: dict, splits: list[SplitSource]) -> None:
    """num_classes not given nor known from the dataset: the largest label seen + 1,
    written into each split's ``labels/y`` attributes where it is not there yet."""
    n = 1 + max(info.get("max_label", -1) for info in meta["splits"].values())
    for s in splits:
        arr = group[f"{s.name}/labels/y"]
        if arr.attrs.get("num_classes") != n:
            arr.attrs["num_classes"] = n


def _take(free: queue.Queue, writer: BlockWriter) -> dict:
    while True:
        try:
            return free.get(timeout=0.5)
        except queue.Empty:
            writer.raise_if_failed()


def _modules_of(sites: list[Site]) -> list[str]:
    return list(dict.fromkeys(s.module for s in sites))


def _check_finite(flags, bufs, split: str, b0: int, rows: int) -> None:
    if not flags:
        return
    ok = torch.isfinite(torch.stack([f for _, f in flags]).cpu())
    if bool(ok.all()):
        return
    key = flags[int((~ok).nonzero()[0])][0]
    bad = (~torch.isfinite(bufs[key][:rows].float())).any(dim=1).nonzero()
    if not len(bad):  # an overflowing sum, not a bad value: nothing to report
        return
    row = int(bad[0])
    raise NonFiniteError(
        f"layer {key!r}, split {split!r}, row {b0 + row}: the activation holds NaN or inf "
        f"(after the cast to the storage dtype; float16 tops out at 65504, so large "
        f"activations may need dtype='bfloat16' or 'float32'). Rows before {b0} are "
        f"committed. Pass nan_policy='ignore' to store non-finite values as they are."
    )


def _fill_block(split: SplitSource, bufs: dict, b0: int, b1: int, extras: dict,
                label_names: list[str], keys: list[str]) -> Block:
    n = b1 - b0
    index = split.index[b0:b1]
    bufs["index"][:n].copy_(torch.from_numpy(index))
    y = bufs["label:y"][:n].numpy()
    for name in label_names[1:]:
        bufs[f"label:{name}"][:n].copy_(torch.from_numpy(
            compute_extra(name, extras[name], split, y, index)))
    block = Block(split.name, b0, b1)
    block.buffers = bufs
    for k in keys:
        t = bufs[k][:n]
        arr = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 \
            else t.numpy()
        block.arrays[f"{split.name}/features/{k}"] = arr
        block.nbytes += arr.nbytes
    for name in label_names:
        block.arrays[f"{split.name}/labels/{name}"] = bufs[f"label:{name}"][:n].numpy()
    block.arrays[f"{split.name}/index"] = bufs["index"][:n].numpy()
    return block
