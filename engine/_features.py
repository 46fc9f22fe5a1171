"""Features on the device: residency, width stacking, and which layers are evaluated together.

A :class:`FeatureCache` holds each (split, layer)'s (N, D) features on the solve's device
for the full-batch passes: in the arithmetic dtype when that fits in a third of the free
memory, else as stored (the passes upcast block by block). With ``group`` (the default on
CUDA), layers of similar width (:func:`width_groups`) share one (L, N, D) stack,
zero-padded to the widest, so that the probes of consecutive stacked layers are evaluated by
batched GEMMs (:meth:`FeatureCache.runs`): many small products become a few large ones. The
padding columns meet zero weights, so the logits are exact.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch

from ._sources import ProbeData

__all__ = ["FeatureCache", "STACK_SLACK", "free_bytes", "width_groups"]

#: layers share a stack (zero-padded to its widest) when its widest is at most this many
#: times its narrowest: a narrower layer's product does at most 25% extra work on padding
STACK_SLACK = 1.25


def free_bytes(device: torch.device) -> int:
    """Free memory of ``device`` in bytes (the host's available RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - non-POSIX
        return 4 << 30


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


class FeatureCache:
    """The features of ``data`` on ``device``, loaded once per (split, layer) and kept.

    ``dtype`` is the arithmetic dtype; ``group`` stacks layers of similar width (default:
    on CUDA only). ``labels(split)`` are the split's labels on the device.
    """

    def __init__(self, data: ProbeData, device: torch.device, dtype: torch.dtype,
                 group: bool | None = None):
        self.data, self.device, self.dtype = data, device, dtype
        self.group = device.type == "cuda" if group is None else group
        self._resident: dict[tuple[str, str], torch.Tensor] = {}
        self._stacks: dict[tuple[str, str], tuple[torch.Tensor, int]] = {}  # -> (stack, index)
        self._labels = {s: y.to(device) for s, y in data.labels.items()}

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def labels(self, split: str) -> torch.Tensor:
        """(N,) int64 labels of ``split`` on the device."""
        return self._labels[split]

    def _target_dtype(self, nbytes_wide: int, stored: torch.dtype) -> torch.dtype:
        """The arithmetic dtype when the features fit in a third of the free memory in it,
        else the stored dtype (upcast block by block)."""
        return self.dtype if nbytes_wide < free_bytes(self.device) // 3 else stored

    def load(self, split: str, layers: Sequence[str]) -> None:
        """Read and check the features of ``layers`` onto the device (stacked by width)."""
        for group in width_groups({layer: self.data.dims[layer] for layer in layers}):
            if not self.group or len(group) < 2:
                for layer in group:
                    self.features(split, layer)
                continue
            n = self.data.rows(split)
            width = max(self.data.dims[layer] for layer in group)
            first = self.data.read(split, group[0])
            target = self._target_dtype(
                len(group) * n * width * torch.finfo(self.dtype).bits // 8, first.dtype)
            # zeros: a narrower layer's padding columns must add nothing to its logits
            stack = torch.zeros(len(group), n, width, dtype=target, device=self.device)
            i = 0
            for layer in group:
                src = first if layer == group[0] else self.data.read(split, layer)
                if target != self.dtype and src.dtype != target:  # stored kept: never narrow
                    self._resident[(split, layer)] = src.to(self.device)
                    continue
                d = src.shape[1]
                stack[i, :, :d].copy_(src)
                self._resident[(split, layer)] = stack[i, :, :d]
                self._stacks[(split, layer)] = (stack, i)
                i += 1

    def features(self, split: str, layer: str) -> torch.Tensor:
        """(N, D) features on the device: in the arithmetic dtype when that fits in a third
        of the device's free memory, else as stored (upcast block by block)."""
        key = (split, layer)
        x = self._resident.get(key)
        if x is None:
            src = self.data.read(split, layer)
            target = self._target_dtype(src.numel() * torch.finfo(self.dtype).bits // 8,
                                        src.dtype)
            x = self._resident[key] = src.to(self.device, target)
        return x

    def stack_of(self, split: str, layer: str) -> tuple[torch.Tensor, int] | None:
        """``(stack (L, N, D), index)`` of the stack holding ``layer``'s features on
        ``split``, or None when they are a tensor of their own."""
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
        """(L, N, D) features of a run (:meth:`runs`): its stack's rows, a view, narrower
        layers zero-padded; a lone layer as (1, N, D_k)."""
        if len(run) == 1:
            return self.features(split, run[0]).unsqueeze(0)
        stack, first = self._stacks[(split, run[0])]
        return stack[first : first + len(run)]
