"""Interim: fitting layers of a stored run (the solve-side refactor replaces this module)."""

from __future__ import annotations

from .options import SolveOptions


def solve_stored(path: str, layers: list[str], options: SolveOptions, *,
                 progress: bool = False) -> dict[str, dict]:
    from .solve import solve

    res = solve(path, layers=layers, progress=progress, **options.to_kwargs())
    return {layer: {} for layer in res.weights}
