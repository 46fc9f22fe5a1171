"""Features on the device: residency within a memory budget, streaming, width stacking.

A :class:`FeatureCache` serves the (N, D) features of each (split, layer) to the full-batch
passes, block by block (:meth:`FeatureCache.blocks`), within a memory ``budget`` (bytes;
``max_memory=`` of ``engine.solve``, by default half of the device's free memory). Each
(split, layer) is, in the order they are loaded (train first: every pass reads it):

- **resident in the arithmetic dtype** when that fits in what is left of the budget;
- else **resident as stored** (float16 stays float16; the passes upcast block by block);
- else **streamed**: every pass reads its rows from the store again, a block of whole
  chunks at a time, on a background thread that keeps two blocks ahead (decompression and
  checksums overlap the GEMMs; on CUDA the blocks are pinned and copied asynchronously).
  Part of the budget is held back for those blocks; a budget that cannot hold one block
  of one chunk's rows is refused (:class:`MemoryBudgetError`).

With ``group`` (the default on CUDA), resident layers of similar width (:func:`width_groups`)
share one (L, N, D) stack, zero-padded to the widest, so that the probes of consecutive
stacked layers are evaluated by batched GEMMs (:meth:`FeatureCache.runs`): many small
products become a few large ones. The padding columns meet zero weights, so the logits are
exact. A streamed layer is a run of its own.
"""

from __future__ import annotations

import ctypes
import os
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from ._sources import ProbeData
from .errors import MemoryBudgetError, StoreError

__all__ = ["BUDGET_SHARE", "FeatureCache", "PREFETCH", "STACK_SLACK", "STREAM_BLOCK_BYTES",
           "free_bytes", "width_groups"]

#: layers share a stack (zero-padded to its widest) when its widest is at most this many
#: times its narrowest: a narrower layer's product does at most 25% extra work on padding
STACK_SLACK = 1.25
#: the default budget: this share of the device's free memory when the solve starts
BUDGET_SHARE = 0.5
#: blocks a stream reads ahead of the one in use
PREFETCH = 2
#: stored bytes a stream reads at a time when the budget allows (whole chunks, at least one):
#: large enough that a pass is GEMMs, not Python, small enough to leave room for residents
STREAM_BLOCK_BYTES = 32 << 20


def free_bytes(device: torch.device) -> int:
    """Free memory of ``device`` in bytes: for the CPU the host's available RAM, Linux's
    ``MemAvailable`` (free pages and the page cache the kernel can drop), or what the
    process's memory cgroup still allows when that is less (:func:`cgroup_free`). Free
    pages alone (``SC_AVPHYS_PAGES``) shrink as a store just written fills the page cache:
    after the full demo, 7 GB free of 23 GB available, and its baselines solve kept float16
    features instead of float32 (78 s against 53 s)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    host = _host_available()
    allowed = cgroup_free()
    return host if allowed is None else min(host, allowed)


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:  # not Linux
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - non-POSIX
        return 4 << 30


def cgroup_free(root: str = "/sys/fs/cgroup", cgroup: str = "/proc/self/cgroup"
                ) -> int | None:
    """Bytes this process's memory cgroup still allows (a container's or a batch job's
    limit, v2 or v1): the limit less the usage, plus the inactive file cache the kernel
    reclaims before it kills; None without a limit (or off Linux). The host's
    ``MemAvailable`` does not see such a limit, and a budget above it ends in the OOM
    killer."""
    try:
        with open(cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified tree
            where, files = os.path.join(root, path.lstrip("/")), (
                "memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            where, files = os.path.join(root, "memory", path.lstrip("/")), (
                "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        try:
            with open(os.path.join(where, files[0])) as f:
                limit = f.read().strip()
            if limit == "max" or int(limit) >= 1 << 60:  # v1 writes "no limit" as ~2^63
                continue
            with open(os.path.join(where, files[1])) as f:
                usage = int(f.read())
            with open(os.path.join(where, "memory.stat")) as f:
                stat = dict(row.split()[:2] for row in f if row.strip())
        except (OSError, ValueError):
            continue
        return max(0, int(limit) - usage + int(stat.get(files[2], 0)))
    return None


def return_freed_memory() -> None:
    """Make glibc return freed blocks of 1 MiB and more to the system at once (a fixed
    ``M_MMAP_THRESHOLD``), for the rest of the process. Streaming allocates and frees a
    block's buffers on several threads every pass; with glibc's default, a threshold that
    grows with every large block freed, those buffers land in per-thread heaps that are
    rarely trimmed, and resident memory grows by several budgets (measured: 290 MB over a
    14 MB budget; 17 MB with this). No-op elsewhere."""
    global _RETURNING
    if _RETURNING:
        return
    _RETURNING = True
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return
    mallopt(M_MMAP_THRESHOLD, 1 << 20)


_RETURNING = False
M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def width_groups(dims: Mapping[str, int], slack: float = STACK_SLACK) -> list[list[str]]:
    """Layers in groups of similar width, narrowest first: sorted by width, a group takes
    the next layer while that one is at most ``slack`` times the group's narrowest."""
    groups: list[list[str]] = []
    for layer in sorted(dims, key=dims.__getitem__):  # stable: equal widths keep their order
        if groups and dims[layer] <= slack * dims[groups[-1][0]]:
            groups[-1].append(layer)
        else:
            groups.append([layer])
    return groups


def _size(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


class FeatureCache:
    """The features of ``data`` for passes on ``device``, within ``budget`` bytes.

    ``dtype`` is the arithmetic dtype; ``group`` stacks resident layers of similar width
    (default: on CUDA only); ``budget`` bounds the bytes of resident features plus stream
    buffers (default :data:`BUDGET_SHARE` of the free memory). ``labels(split)`` are the
    split's labels on the device (not counted: 8 bytes a row).
    """

    def __init__(self, data: ProbeData, device: torch.device, dtype: torch.dtype,
                 group: bool | None = None, budget: int | None = None):
        self.data, self.device, self.dtype = data, device, dtype
        self.group = device.type == "cuda" if group is None else group
        self.budget = int(free_bytes(device) * BUDGET_SHARE) if budget is None else int(budget)
        self._left = self.budget
        self._reserve = 0  # bytes held back for stream blocks, once anything streams
        self._upcast = True  # whether the current load keeps features in the arithmetic dtype
        self._resident: dict[tuple[str, str], torch.Tensor] = {}
        self._stacks: dict[tuple[str, str], tuple[torch.Tensor, int]] = {}  # -> (stack, index)
        self._streamed: dict[tuple[str, str], int] = {}  # -> rows per read
        self._labels = {s: y.to(device) for s, y in data.labels.items()}

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def labels(self, split: str) -> torch.Tensor:
        """(N,) int64 labels of ``split`` on the device."""
        return self._labels[split]

    def streamed(self, split: str, layer: str) -> bool:
        """Whether ``layer``'s features on ``split`` are read from the source every pass."""
        return (split, layer) in self._streamed

    # -- placement -------------------------------------------------------------------------
    def load(self, splits: str | Sequence[str], layers: Sequence[str]) -> None:
        """Place the features of ``layers`` on ``splits`` (in that order: what comes first
        gets the budget first): read resident ones onto the device (stacked by width),
        checked finite; plan the reads of streamed ones (checked as each pass reads them)."""
        splits = [splits] if isinstance(splits, str) else list(splits)
        todo = [(s, layer) for s in splits for layer in layers if not self._placed(s, layer)]
        if not todo:
            return
        if self._reserve == 0:  # something will stream: keep room for its blocks
            rest = [(s, layer) for s in self.data.splits for layer in self.data.layers
                    if not self._placed(s, layer)]
            if self._stored_bytes(todo) > self._left:
                self._hold_back(todo)
            elif self._stored_bytes(rest) > self._left:
                # a later load will (SGD places each layer as it finishes): keep room for
                # its blocks now, beside this load, while there is some
                self._hold_back(rest, room=self._left - self._stored_bytes(todo))
        wide = sum(self.data.rows(s) * self.data.dims[layer] for s, layer in todo)
        # upcast only when everything fits upcast: a budget is spent on rows, not precision
        self._upcast = wide * _size(self.dtype) <= self._left
        for split in splits:
            mine = [layer for s, layer in todo if s == split]
            for group in width_groups({layer: self.data.dims[layer] for layer in mine}):
                if self.group and len(group) > 1 and self._stack(split, group):
                    continue
                # too large upcast: stack the layers stored alike (never narrow one)
                alike: dict[torch.dtype, list[str]] = {}
                for layer in group:
                    alike.setdefault(self.data.stored[layer], []).append(layer)
                for same in alike.values():
                    if not (self.group and 1 < len(same) < len(group)
                            and self._stack(split, same)):
                        for layer in same:
                            self._place(split, layer)

    def _placed(self, split: str, layer: str) -> bool:
        return (split, layer) in self._resident or (split, layer) in self._streamed

    def _target(self, nbytes_wide: int, stored: torch.dtype) -> torch.dtype | None:
        """The dtype to keep ``nbytes_wide`` bytes (arithmetic dtype) of features in: the
        arithmetic one when all of a load fits in it, else the stored one when these fit,
        else None (stream them)."""
        if self._upcast and nbytes_wide <= self._left:
            return self.dtype
        if nbytes_wide // _size(self.dtype) * _size(stored) <= self._left:
            return stored
        return None

    def _read_into(self, out: torch.Tensor, split: str, layer: str) -> None:
        """Copy ``layer``'s rows into ``out`` (N, D_k) block by block: never a second whole
        copy in memory."""
        step = self.data.block_rows * max(1, STREAM_BLOCK_BYTES // max(
            1, self.data.block_rows * self.data.dims[layer] * _size(self.data.stored[layer])))
        n = out.shape[0]
        for r0 in range(0, n, step):
            out[r0 : r0 + step].copy_(self.data.read(split, layer, r0, min(r0 + step, n)))

    def _place(self, split: str, layer: str) -> None:
        n, d = self.data.rows(split), self.data.dims[layer]
        target = self._target(n * d * _size(self.dtype), self.data.stored[layer])
        if target is None:
            self._streamed[(split, layer)] = self._stream_rows(layer, self._reserve)
            return
        x = torch.empty(n, d, dtype=target, device=self.device)
        self._read_into(x, split, layer)
        self._left -= x.numel() * x.element_size()
        self._resident[(split, layer)] = x

    def _stack(self, split: str, group: list[str]) -> bool:
        """Stack ``group`` (resident, zero-padded to its widest) when it fits; else False."""
        n = self.data.rows(split)
        width = max(self.data.dims[layer] for layer in group)
        stored = {self.data.stored[layer] for layer in group}
        target = self._target(len(group) * n * width * _size(self.dtype),
                              stored.pop() if len(stored) == 1 else self.dtype)
        if target is None:
            return False
        # zeros: a narrower layer's padding columns must add nothing to its logits
        stack = torch.zeros(len(group), n, width, dtype=target, device=self.device)
        self._left -= stack.numel() * stack.element_size()
        for i, layer in enumerate(group):
            self._read_into(stack[i, :, : self.data.dims[layer]], split, layer)
            self._resident[(split, layer)] = stack[i, :, : self.data.dims[layer]]
            self._stacks[(split, layer)] = (stack, i)
        return True

    # -- streaming -------------------------------------------------------------------------
    def _row_bytes(self, layer: str) -> int:
        """Bytes a streamed row of ``layer`` holds: the blocks read ahead, the one in use
        and the one being replaced (as stored), and the one in use in the arithmetic dtype."""
        d = self.data.dims[layer]
        return d * ((PREFETCH + 2) * _size(self.data.stored[layer]) + _size(self.dtype))

    def _stream_rows(self, layer: str, room: int) -> int:
        """Rows per read of a streamed ``layer``: whole chunks, as many as :data:
        `STREAM_BLOCK_BYTES` (as stored) allows and ``room`` holds, at least one chunk."""
        chunk = self.data.block_rows
        chunks = STREAM_BLOCK_BYTES // (chunk * self.data.dims[layer]
                                        * _size(self.data.stored[layer]))
        return chunk * max(1, min(chunks, room // (chunk * self._row_bytes(layer))))

    def check(self, splits: Sequence[str], layers: Sequence[str]) -> None:
        """Raise :class:`MemoryBudgetError` now if :meth:`load` of ``layers`` on ``splits``
        would (nothing is read or placed): before a solve writes anything."""
        todo = [(s, layer) for s in splits for layer in layers if not self._placed(s, layer)]
        if todo and self._reserve == 0 and self._stored_bytes(todo) > self._left:
            self._one_block(todo)

    def _stored_bytes(self, todo: list[tuple[str, str]]) -> int:
        return sum(self.data.rows(s) * self.data.dims[layer] * _size(self.data.stored[layer])
                   for s, layer in todo)

    def _one_block(self, todo: list[tuple[str, str]]) -> str:
        """The widest layer that may stream, once its one-chunk block fits what is left."""
        def need(key: tuple[str, str]) -> int:  # one chunk's rows, with read-ahead
            return min(self.data.block_rows, self.data.rows(key[0])) * self._row_bytes(key[1])

        split, widest = max(todo, key=need)
        if need((split, widest)) > self._left:
            rows = min(self.data.block_rows, self.data.rows(split))
            raise MemoryBudgetError(
                f"max_memory={self.budget:,} bytes is too small to stream layer {widest!r} "
                f"of split {split!r}: one block of its rows (rows 0-{rows - 1}, "
                f"{rows} x {self.data.dims[widest]} "
                f"{str(self.data.stored[widest]).removeprefix('torch.')}) needs "
                f"{need((split, widest)):,} bytes with its read-ahead ({self._left:,} left); "
                f"raise max_memory to at least "
                f"{self.budget - self._left + need((split, widest)):,} bytes")
        return widest

    def _hold_back(self, todo: list[tuple[str, str]], room: int | None = None) -> None:
        """Keep room for the stream blocks of the widest layer of ``todo`` that may stream:
        as many rows as ``room`` (default: all that is left) holds, at least one chunk."""
        widest = self._one_block(todo)
        return_freed_memory()
        rows = self._stream_rows(widest, self._left if room is None else room)
        self._reserve = rows * self._row_bytes(widest)
        self._left -= self._reserve

    def _stream(self, split: str, layer: str) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, rows as stored)`` of ``layer`` on ``split``, read ahead on a thread."""
        n, step = self.data.rows(split), self._streamed[(split, layer)]
        ranges = [(a, min(a + step, n)) for a in range(0, n, step)]
        pin = self.device.type == "cuda"

        def read(a: int, b: int) -> torch.Tensor:
            try:
                x = self.data.read(split, layer, a, b)
            except StoreError as e:  # e.g. a chunk corrupted since the solve began
                at = self.data.offset
                raise type(e)(f"streaming rows [{at + a}, {at + b}) of layer {layer!r}, split "
                              f"{split!r} for the solve: {e}") from e
            return x.pin_memory() if pin else x

        with ThreadPoolExecutor(1, thread_name_prefix="probe-engine-read") as pool:
            ahead = deque(pool.submit(read, *r) for r in ranges[:PREFETCH])
            try:
                for i, (a, _) in enumerate(ranges):
                    x = ahead.popleft().result()
                    if i + PREFETCH < len(ranges):
                        ahead.append(pool.submit(read, *ranges[i + PREFETCH]))
                    yield a, x
                    del x  # the next block may take its place
            finally:
                for f in ahead:  # the pass stopped early: no more reads
                    f.cancel()

    # -- the passes' view ------------------------------------------------------------------
    def blocks(self, split: str, run: Sequence[str], rows: int
               ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, (L, B, D) block in the arithmetic dtype)`` over the rows of ``split``
        for a run (:meth:`runs`), B <= ``rows``: views of resident features, or the reads of
        a streamed layer (placed by :meth:`load` if it was not)."""
        self.load(split, run)
        if len(run) == 1 and self.streamed(split, run[0]):
            for start, x in self._stream(split, run[0]):
                x = x.to(self.device, non_blocking=True).to(self.dtype)
                for r0 in range(0, x.shape[0], rows):
                    yield start + r0, x[r0 : r0 + rows].unsqueeze(0)
            return
        x = self.run_features(split, run)
        for r0 in range(0, x.shape[1], rows):
            yield r0, x[:, r0 : r0 + rows].to(self.dtype)

    def features(self, split: str, layer: str) -> torch.Tensor:
        """(N, D) resident features of ``layer`` on ``split`` (placed if they were not): in
        the arithmetic dtype, or as stored when the budget holds only that. A streamed layer
        has none: read it by :meth:`blocks`."""
        self.load(split, [layer])
        if self.streamed(split, layer):
            raise MemoryBudgetError(f"layer {layer!r} of split {split!r} does not fit "
                                    f"max_memory={self.budget:,} bytes: it is streamed")
        return self._resident[(split, layer)]

    def stack_of(self, split: str, layer: str) -> tuple[torch.Tensor, int] | None:
        """``(stack (L, N, D), index)`` of the stack holding ``layer``'s features on
        ``split``, or None when they are a tensor of their own (or streamed)."""
        return self._stacks.get((split, layer))

    def runs(self, split: str, by_layer: Mapping[str, Sequence]) -> list[list[str]]:
        """Layers evaluated together, given the probes asked of each (``by_layer``: layer ->
        its probes): consecutive layers of one stack asking for as many probes each; every
        other layer alone."""
        def position(layer: str) -> tuple[int, int]:
            here = self._stacks.get((split, layer))
            return (id(here[0]), here[1]) if here is not None else (0, 0)

        runs: list[list[str]] = []
        for layer in sorted(by_layer, key=position):
            here = self._stacks.get((split, layer))
            if runs and here is not None:
                prev = self._stacks.get((split, runs[-1][-1]))
                if (prev is not None and prev[0] is here[0] and prev[1] + 1 == here[1]
                        and len(by_layer[layer]) == len(by_layer[runs[-1][-1]])):
                    runs[-1].append(layer)
                    continue
            runs.append([layer])
        return runs

    def run_features(self, split: str, run: Sequence[str]) -> torch.Tensor:
        """(L, N, D) resident features of a run (:meth:`runs`): its stack's rows, a view,
        narrower layers zero-padded; a lone layer as (1, N, D_k)."""
        if len(run) == 1:
            return self.features(split, run[0]).unsqueeze(0)
        stack, first = self._stacks[(split, run[0])]
        return stack[first : first + len(run)]
