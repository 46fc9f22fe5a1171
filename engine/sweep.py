"""``sweep``: probes across training, one store and one solve per checkpoint (the paper's
Figs. 6 and 9), ready for ``engine.report``'s site x checkpoint heatmap."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .build import build_store
from .errors import InvalidArgumentError, StoreMismatchError
from .format import check_name
from .results import ProbeResults
from .solve import solve

__all__ = ["sweep"]


def _load(model_fn: Callable[[], nn.Module], checkpoint: Any) -> nn.Module:
    if isinstance(checkpoint, nn.Module):
        return checkpoint
    model = model_fn()
    if isinstance(checkpoint, (str, Path)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise InvalidArgumentError(f"a checkpoint is a module, a state_dict or a path to one, not "
                                   f"{type(checkpoint).__name__}")
    model.load_state_dict(checkpoint)
    return model


def _sites(store) -> list[tuple]:
    return [(layer.name, layer.dim, layer.reduction) for layer in store.meta.layers]


def sweep(model_fn: Callable[[], nn.Module], checkpoints: Mapping[str, Any], data: Any,
          out: str | Path, *, solve_kwargs: Mapping[str, Any] | None = None,
          progress: bool = True, **build_kwargs: Any) -> dict[str, ProbeResults]:
    """Build and solve one store per checkpoint; returns ``{checkpoint: ProbeResults}`` in
    the order given, for ``engine.report(results, ...)``.

    Args:
        model_fn: makes the architecture (``engine.models.mnist_convnet``, ...).
        checkpoints: name -> a module, a state_dict, or a state_dict file (read with
            ``torch.load(weights_only=True)``), in training order.
        data, build_kwargs: as for :func:`engine.build_store`; every store gets the same
            split (seeded) and the same reductions (fixed by the layer shapes and the seed),
            so only the weights differ. Stores go to ``out/<name>.zarr``; a rerun reuses the
            finished ones.
        solve_kwargs: for :func:`engine.solve` (default: its defaults).
    """
    out = Path(out)
    results: dict[str, ProbeResults] = {}
    first = None
    for name, checkpoint in checkpoints.items():
        check_name(name, "checkpoint name")  # it names a store: out/<name>.zarr
        store = build_store(_load(model_fn, checkpoint), data, out / f"{name}.zarr",
                            progress=progress, **build_kwargs)
        if first is None:
            first = store
        elif _sites(store) != _sites(first):
            raise StoreMismatchError(f"checkpoint {name!r} gives other probe sites or "
                                     f"reductions than {next(iter(checkpoints))!r}; a sweep "
                                     f"needs one architecture")
        results[name] = solve(store, progress=progress, **dict(solve_kwargs or {}))
    return results
