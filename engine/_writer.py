"""A background thread that compresses and writes blocks while the model runs.

The capture loop fills a block (a set of per-array host buffers), hands it over, and takes a
free one from a small pool: memory is bounded by ``pool`` blocks whatever the data size.
Blocks are written and committed in order; the first failure stops the thread and is raised
in the capture loop at its next hand-over (or at ``close``), naming the array and rows.
"""

from __future__ import annotations

import errno as _errno
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from .errors import StoreError


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
            at[:] = [arr.path, f"{arr.path}/c/{c}" + "/0" * (arr.ndim - 1)]
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
