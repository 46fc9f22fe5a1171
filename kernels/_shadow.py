"""``import kernels`` from a checkout's root: the installed distribution of that name, not
this folder (which is ``engine.kernels``)."""

from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import PathFinder
from pathlib import Path


def hand_over() -> None:
    """Replace the top-level ``kernels`` being imported (this folder, found through the
    checkout's root on ``sys.path``) by the one the rest of ``sys.path`` holds, or fail as
    an absent module does when there is none."""
    sys.modules.pop(__name__, None)  # this helper belonged to the shadowing package
    root = Path(__file__).resolve().parents[1]
    paths = [p for p in sys.path if Path(p or ".").resolve() != root]
    spec = PathFinder.find_spec("kernels", paths)
    if spec is None or spec.loader is None:
        sys.modules.pop("kernels", None)
        raise ModuleNotFoundError(
            "No module named 'kernels': the kernels/ folder of probe-engine's checkout is "
            "engine.kernels, not a top-level package", name="kernels")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("kernels", None)
        raise
