"""Captured rows into a store, block by block: the store side of the capture loop.

:func:`write_rows` runs the model over rows of each split (:class:`engine.capture.Capture`),
filling blocks of rows (a multiple of the batch size, a whole number of chunks of every
array) in host buffers straight from the hooks; a background :class:`BlockWriter` compresses,
writes and commits each block while the model runs the next. Memory is bounded by two
blocks whatever the data size. A block is committed (``rows_committed`` advanced) only after
all of its arrays are on disk, so an interrupted build resumes at its first uncommitted block
and ends with the same arrays. The first failure of the writer is raised in the capture loop
at its next hand-over (or at ``close``), naming the store, split, rows, array and chunk.
"""

from __future__ import annotations

import errno as _errno
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from . import format as fmt
from ._data import SplitSource, compute_extra
from ._tokens import keep_mask
from .capture import Capture, Runner, Site
from .errors import DataError, NonFiniteError, StoreError
from .options import CaptureOptions
from .reduce import Reduction

__all__ = ["Block", "BlockWriter", "CaptureJob", "write_rows", "write_error"]

TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Block:
    """Rows [start, stop) of one split, array path -> (rows, ...) host buffer."""

    split: str
    start: int
    stop: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    nbytes: int = 0
    buffers: Any = None  # what the arrays are views of, handed back by ``release``


class BlockWriter:
    """Writes each handed-over block's arrays to ``group``, then calls ``commit(block)``;
    ``release(block)`` hands its buffers back to the capture loop, written or not."""

    def __init__(self, group: zarr.Group, commit: Callable[[Block], None],
                 release: Callable[[Block], None], *, depth: int = 1,
                 only: dict[str, set[int]] | None = None, where: str | None = None):
        self.group = group
        self.only = only  # array path -> row-chunk indices to write (a repair); None: all
        self.where = where or str(group.store)
        self.commit = commit
        self.release = release
        self.bytes_written = 0
        self.seconds_busy = 0.0
        self._queue: queue.Queue[Block | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._thread = threading.Thread(target=self._run, name="probe-engine-writer", daemon=True)
        self._thread.start()

    def put(self, block: Block) -> None:
        """Queue a block; blocks while the writer is ``depth`` blocks behind."""
        self.raise_if_failed()
        while True:
            try:
                self._queue.put(block, timeout=0.5)
                return
            except queue.Full:
                self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Write what is queued, stop the thread, and raise its error if it had one."""
        if self._thread.is_alive():
            while True:
                try:
                    self._queue.put(None, timeout=0.5)
                    break
                except queue.Full:
                    if not self._thread.is_alive():
                        break
            self._thread.join()
        self.raise_if_failed()

    def _array(self, path: str) -> zarr.Array:
        arr = self._arrays.get(path)
        if arr is None:
            # every committed chunk must exist on disk (verify checks it), even one equal to
            # the fill value; this also spares zarr a comparison pass over every chunk
            arr = self._arrays[path] = self.group[path].with_config({"write_empty_chunks": True})
        return arr

    def _write(self, arr: zarr.Array, start: int, data: np.ndarray, at: list) -> None:
        # One chunk per call: zarr then encodes the caller's buffer as is, where a multi-chunk
        # write would first copy every chunk into a fill-value-initialised scratch array.
        step = arr.chunks[0]
        wanted = None if self.only is None else self.only.get(arr.path, set())
        for a in range(0, len(data), step):
            c = (start + a) // step
            if wanted is not None and c not in wanted:
                continue
            at[:] = [arr.path, fmt.chunk_key(arr.path, c, arr.ndim)]
            arr[start + a : start + a + step] = data[a : a + step]

    def _run(self) -> None:
        while True:
            block = self._queue.get()
            if block is None:
                return
            if self._error is not None:
                self.release(block)
                continue  # drain without writing after a failure
            t0 = time.perf_counter()
            at: list = []
            try:
                for path, data in block.arrays.items():
                    at[:] = [path, None]
                    self._write(self._array(path), block.start, data, at)
                at = []
                self.commit(block)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the capture thread
                self._error = write_error(exc, self.where, block, *(at or [None, None]))
            else:
                self.bytes_written += block.nbytes
                self.seconds_busy += time.perf_counter() - t0
            finally:
                self.release(block)


def write_error(exc: BaseException, where: str, block: Block, array: str | None,
                chunk: str | None) -> StoreError:
    """The error of a failed block write: the store, split, rows, array and chunk, the
    cause in words (a full disk, no permission, ...), and what to do."""
    if array is None:
        what = "the commit (root metadata)"
    elif chunk is None:
        what = f"array {array!r}"
    else:
        what = f"chunk {chunk} (array {array!r})"
    errno_ = getattr(exc, "errno", None)
    if errno_ == _errno.ENOSPC or errno_ == _errno.EDQUOT:
        cause = f"the disk holding {where} is full ({exc}); free some space"
    elif errno_ in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
        cause = f"no permission to write into {where} ({exc}); make it writable"
    else:
        cause = f"{type(exc).__name__}: {exc}; fix the cause"
    err = StoreError(
        f"writing rows {block.start}..{block.stop} of split {block.split!r} of the store at "
        f"{where} failed at {what}: {cause}, then rerun build_store with resume=True. Rows "
        f"before {block.start} are committed and intact; no chunk is half-written"
    )
    err.__cause__ = exc
    return err


# -- the capture loop's store side -------------------------------------------------------
@dataclass
class CaptureJob:
    """Everything capturing rows into a store needs beside the model, whichever process runs
    it (a Dask task gets one): the options, the resolved batch size, the splits, the probe
    sites with their reductions, and the extra label sets."""

    options: CaptureOptions
    batch_size: int
    splits: list[SplitSource]
    sites: list[Site]
    reductions: dict[str, Reduction]
    extras: dict[str, Any] = field(default_factory=dict)
    select: dict[str, int | str] = field(default_factory=dict)  # module -> selector
    #: rows="tokens": split -> (items + 1,) first token row of each item, then the total
    offsets: dict[str, np.ndarray] = field(default_factory=dict)
    #: rows="tokens" with inputs["input_ids"]: each row's token id stored as the label set
    #: "token" (the token types of a control task, engine._tasks)
    token_ids: bool = False

    @property
    def label_names(self) -> list[str]:
        return ["y", *sorted(self.extras), *(["token"] if self.token_ids else [])]

    def rows(self, split: SplitSource) -> int:
        """The store rows of ``split``: its items, or (rows="tokens") its stored tokens."""
        return int(self.offsets[split.name][-1]) if self.offsets else split.rows

    def selector(self, site: Site) -> int | str | None:
        """The selector that picked ``site``'s tensor (outputs and the model input)."""
        return (self.select.get(site.module)
                if site.side == "output" or not site.module else None)


def write_rows(runner: Runner, job: CaptureJob, group: zarr.Group, meta: fmt.StoreMeta, *,
               path: str, ranges: dict[str, tuple[int, int]] | None = None,
               on_commit: Callable[[Block], None] | None = None,
               only: dict[str, set[int]] | None = None, progress: bool = False) -> None:
    """Capture rows [start, stop) of each split into the store (default: from
    ``rows_committed`` to the end, committing each block in the root metadata ``meta``;
    a shard task passes its own row range of whole blocks and ``on_commit``; a repair
    passes the chunks to rewrite as ``only``)."""
    block_rows = meta.config.block_rows
    num_classes = meta.dataset.num_classes
    if ranges is None:
        ranges = {s.name: (meta.splits[s.name].rows_committed, meta.splits[s.name].rows)
                  for s in job.splits}
    todo = [s for s in job.splits if s.name in ranges and ranges[s.name][0] < ranges[s.name][1]]
    if not todo:
        return
    opts = job.options
    dtype = TORCH_DTYPES[opts.dtype]
    capture = Capture(runner, job.sites, job.reductions, sides=opts.sites, dtype=dtype,
                      finite_sums=opts.nan_policy == "raise", select=job.select)
    keys, labels = capture.keys, job.label_names
    dims = {k: job.reductions[k].dim for k in keys}

    def new_buffers() -> dict[str, torch.Tensor]:
        bufs = {k: torch.empty((block_rows, dims[k]), dtype=dtype, pin_memory=capture.cuda)
                for k in keys}
        bufs.update({f"label:{n}": torch.empty(block_rows, dtype=torch.int64) for n in labels})
        bufs["index"] = torch.empty(block_rows, dtype=torch.int64)
        if job.offsets:
            bufs["position"] = torch.empty(block_rows, dtype=torch.int64)
        return bufs

    free: queue.Queue[dict] = queue.Queue()
    for _ in range(2):
        free.put(new_buffers())

    def commit(block: Block) -> None:
        info = meta.splits[block.split]
        info.rows_committed = block.stop
        top = int(block.arrays[fmt.labels_path(block.split)].max())
        info.max_label = top if info.max_label is None else max(info.max_label, top)
        if num_classes is None and meta.complete:
            # the last commit: num_classes first, so that a complete store always has it
            fmt.infer_num_classes(group, meta)
        fmt.write_meta(group, meta)  # atomic (a rename), and the last write of a block

    writer = BlockWriter(group, on_commit or commit, lambda b: free.put(b.buffers),
                         only=only, where=path)
    total = sum(ranges[s.name][1] - ranges[s.name][0] for s in todo)
    bar = tqdm(total=total, unit="token" if job.offsets else "row", unit_scale=True,
               disable=not progress, desc=f"build {Path(path).name}", smoothing=0.1,
               mininterval=0.5)
    if job.offsets:
        try:
            with capture.hooked():
                for split in todo:
                    _write_tokens(capture, job, split, ranges[split.name], block_rows, free,
                                  writer, bar, path)
        finally:
            bar.close()
            writer.close()
        return
    t0 = time.perf_counter()
    try:
        with capture.hooked():
            for split in todo:
                start, stop = ranges[split.name]
                batches = split.batches(start, job.batch_size, pin_memory=capture.cuda)
                for b0 in range(start, stop, block_rows):
                    b1 = min(b0 + block_rows, stop)
                    bufs = _take(free, writer)
                    capture.take_sums()
                    at = 0
                    while at < b1 - b0:
                        try:
                            inputs, y = next(batches)
                        except StopIteration:
                            raise DataError(
                                f"split {split.name!r} yielded fewer rows than its dataset's "
                                f"length ({split.rows}); the dataset changed during the "
                                f"build") from None
                        n = len(y)
                        _check_range(y, num_classes, split.name, b0 + at)
                        try:
                            capture.batch(inputs, lambda rows, a=at, b=bufs: {
                                k: b[k][a : a + rows] for k in keys})
                        except Exception as exc:
                            exc.add_note(f"probe-engine: on split {split.name!r}, rows "
                                         f"{b0 + at}..{b0 + at + n - 1} of the store {path}; "
                                         f"rows before {b0} are committed. Fix the model or "
                                         f"data and rerun build_store with resume=True to "
                                         f"finish.")
                            raise
                        bufs["label:y"][at : at + n].copy_(y)
                        at += n
                        bar.update(n)
                    if capture.cuda:
                        torch.cuda.current_stream(runner.device).synchronize()
                    _check_finite(capture.take_sums(), bufs, split.name, b0, b1 - b0)
                    writer.put(_fill_block(split, bufs, b0, b1, job, keys))
                    if writer.seconds_busy:
                        mb = writer.bytes_written / 2**20 / (time.perf_counter() - t0)
                        bar.set_postfix_str(f"{mb:.0f} MB/s written", refresh=False)
    finally:
        bar.close()
        writer.close()


def _check_range(y: torch.Tensor, num_classes: int | None, split: str, row: int) -> None:
    if num_classes is not None and len(y) and int(y.max()) >= num_classes:
        bad = int((y >= num_classes).nonzero()[0])
        raise DataError(f"split {split!r}, row {row + bad}: label {int(y[bad])} is out of "
                        f"range for {num_classes} classes; pass num_classes= or fix the labels")


def _take(free: queue.Queue, writer: BlockWriter) -> dict:
    while True:
        try:
            return free.get(timeout=0.5)
        except queue.Empty:
            writer.raise_if_failed()


def _check_finite(sums: list[tuple[str, torch.Tensor]], bufs: dict, split: str, b0: int,
                  rows: int, committed: int | None = None) -> None:
    """Raise :class:`NonFiniteError` naming the first non-finite row of ``bufs`` (rows
    ``b0`` on) when a site's sum is not finite; ``committed``: the rows before it are
    committed (default ``b0``)."""
    committed = b0 if committed is None else committed
    if not sums:
        return
    ok = torch.isfinite(torch.stack([f for _, f in sums]).cpu())
    if bool(ok.all()):
        return
    key = sums[int((~ok).nonzero()[0])][0]
    bad = (~torch.isfinite(bufs[key][:rows].float())).any(dim=1).nonzero()
    if not len(bad):  # an overflowing sum, not a bad value: nothing to report
        return
    row = int(bad[0])
    raise NonFiniteError(
        f"layer {key!r}, split {split!r}, row {b0 + row}: the activation holds NaN or inf "
        f"(after the cast to the storage dtype; float16 tops out at 65504, so large "
        f"activations may need dtype='bfloat16' or 'float32'). Rows before {committed} are "
        f"committed. Pass nan_policy='ignore' to store non-finite values as they are."
    )


def _fill_block(split: SplitSource, bufs: dict, b0: int, b1: int, job: CaptureJob,
                keys: list[str]) -> Block:
    n = b1 - b0
    index = split.index[b0:b1]
    bufs["index"][:n].copy_(torch.from_numpy(index))
    y = bufs["label:y"][:n].numpy()
    for name in job.label_names[1:]:
        bufs[f"label:{name}"][:n].copy_(torch.from_numpy(
            compute_extra(name, job.extras[name], split, y, index)))
    return _block(split, bufs, b0, b1, keys, job.label_names)


def _block(split: SplitSource, bufs: dict, b0: int, b1: int, keys: list[str],
           labels: list[str]) -> Block:
    """The block of rows [b0, b1) whose arrays are views of the filled ``bufs``."""
    n = b1 - b0
    block = Block(split.name, b0, b1)
    block.buffers = bufs
    for k in keys:
        t = bufs[k][:n]
        arr = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 \
            else t.numpy()
        block.arrays[fmt.features_path(split.name, k)] = arr
        block.nbytes += arr.nbytes
    for name in labels:
        block.arrays[fmt.labels_path(split.name, name)] = bufs[f"label:{name}"][:n].numpy()
    block.arrays[fmt.index_path(split.name)] = bufs["index"][:n].numpy()
    if "position" in bufs:  # token rows
        block.arrays[fmt.position_path(split.name)] = bufs["position"][:n].numpy()
    return block


def _write_tokens(capture: Capture, job: CaptureJob, split: SplitSource, rows: tuple[int, int],
                  block_rows: int, free: queue.Queue, writer: BlockWriter, bar,
                  path: str) -> None:
    """Token rows [start, stop) of ``split`` (a whole number of blocks, but the last) into
    the store. The capture starts at the batch holding row ``start``: batches always begin
    at multiples of the batch size, so a resumed or sharded build sees the batches an
    uninterrupted one saw (the same arrays, bit for bit), and drops the rows before
    ``start``. Rows gather in the block buffers, which a batch may fill and spill over."""
    start, stop = rows
    offsets, size = job.offsets[split.name], job.batch_size
    item = int(np.searchsorted(offsets, start, side="right")) - 1
    item -= item % size
    row = int(offsets[item])  # the token row of the first stored token of that batch
    keys = capture.keys
    bufs, b0, at = _take(free, writer), start, 0

    def flush() -> None:
        nonlocal bufs, b0, at
        writer.put(_block(split, bufs, b0, b0 + at, keys, job.label_names))
        bufs, b0, at = (_take(free, writer), b0 + at, 0) if b0 + at < stop else (None, 0, 0)

    for inputs, y in split.batches(item, size, pin_memory=capture.cuda, tokens=True):
        keep = keep_mask(inputs, y, split.name, item)
        n = int(keep.sum())
        if n:
            where = f"items {item}..{item + len(y) - 1}, token rows {row}..{row + n - 1}"
            try:
                feats = capture.batch(inputs, mask=keep.to(capture.runner.device))
            except Exception as exc:
                exc.add_note(f"probe-engine: on split {split.name!r}, {where} of the store "
                             f"{path}; rows before {b0} are committed. Fix the model or data "
                             f"and rerun build_store with resume=True to finish.")
                raise
            # the capture's per-site sums of this batch (nan_policy="raise"; else none)
            _check_finite(capture.take_sums(), feats, split.name, row, n, committed=b0)
            b, t = keep.nonzero(as_tuple=True)
            # a position counts the item's own tokens: left padding does not shift it
            first = (inputs["attention_mask"] != 0).to(torch.uint8).argmax(dim=1)
            cols = {**feats, "label:y": y[keep], "index": torch.from_numpy(
                split.index[item : item + len(y)])[b], "position": t - first[b]}
            if job.token_ids:
                cols["label:token"] = inputs["input_ids"][keep]
            lo, hi = max(0, start - row), min(n, stop - row)
            while lo < hi:
                take = min(hi - lo, block_rows - at)
                for name, col in cols.items():
                    bufs[name][at : at + take].copy_(col[lo : lo + take])
                at, lo = at + take, lo + take
                bar.update(take)
                if at == block_rows or b0 + at == stop:
                    flush()
        row += n
        item += len(y)
        if row >= stop:
            return
    raise DataError(f"split {split.name!r} yielded fewer tokens than counted before the "
                    f"build ({stop}); the dataset changed during the build")
