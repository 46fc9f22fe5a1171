"""Capture: choose probe sites in a model and hook them.

A *site* is one side ("input" or "output") of one call of one module. Its *key* names its
arrays in the store: ``"input"`` for the model's own input, ``"<module>"`` for a module's
output, ``"<module>:input"`` for its input, and a ``":<k>"`` suffix for the k-th extra call of
a module that runs several times in one forward (ResNet blocks reuse one ReLU three times).

Hooks reduce and copy their tensor at once, so that an in-place operation later in the
network (``ReLU(inplace=True)``) cannot change what was captured, and they never change the
model's outputs.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.activation import MultiheadAttention
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.pooling import (
    _AdaptiveAvgPoolNd,
    _AdaptiveMaxPoolNd,
    _AvgPoolNd,
    _LPPoolNd,
    _MaxPoolNd,
)

from .errors import InvalidArgumentError, LayerNotFoundError, ProbeEngineError
from .format import name_problem

__all__ = ["Site", "select_modules", "discover_sites", "hooked", "is_auto_type"]

SITES = ("input", "output")
_POOLING = (_MaxPoolNd, _AvgPoolNd, _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _LPPoolNd)
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Site:
    """One probe site: ``side`` ("input"/"output") of call ``call`` of module ``module``."""

    key: str
    module: str
    side: str
    call: int = 0


def is_auto_type(m: nn.Module) -> bool:
    """Conv, linear, activation and pooling modules: the sites of the paper's Fig. 2."""
    if isinstance(m, (_ConvNd, nn.Linear, *_POOLING)):
        return True
    return type(m).__module__ == "torch.nn.modules.activation" and not isinstance(
        m, MultiheadAttention
    )


def _not_found(what: str, names: list[str]) -> LayerNotFoundError:
    near = difflib.get_close_matches(what, names, n=5, cutoff=0.5)
    hint = f"closest: {', '.join(map(repr, near))}" if near else (
        f"the model has {len(names)} modules, e.g. {', '.join(map(repr, names[:8]))}"
    )
    return LayerNotFoundError(
        f"no module named {what!r} in the model; {hint}. Names are those of "
        f"model.named_modules(); 'input' means the model's input; globs like 'layer*.0' work."
    )


def select_modules(model: nn.Module, layers) -> list[str]:
    """Resolve ``layers`` to module names in registration order (``""`` = the model input).

    ``layers``: ``"auto"``, or one or a list of exact names, glob patterns, module types,
    ``"input"`` (the model's input) and ``"auto"``.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    names = [n for n, _ in named]
    items = [layers] if isinstance(layers, (str, type)) else list(layers)
    if not items:
        raise LayerNotFoundError("`layers` is empty; pass 'auto' or some module names")
    chosen: set[str] = set()
    for item in items:
        if isinstance(item, type):
            if not issubclass(item, nn.Module):
                raise InvalidArgumentError(
                    f"layers: {item!r} is a type but not an nn.Module subclass")
            hits = {n for n, m in named if isinstance(m, item)}
            if not hits:
                raise LayerNotFoundError(f"no module of type {item.__name__} in the model")
        elif not isinstance(item, str):
            raise InvalidArgumentError(
                f"layers: expected names, globs or module types, got {item!r}")
        elif item == "auto":
            hits = {""} | {n for n, m in named if is_auto_type(m)}
        elif item == "input":
            hits = {""}
        elif _GLOB_CHARS & set(item):
            hits = {n for n in names if fnmatch.fnmatchcase(n, item)}
            if not hits:
                raise _not_found(item, names)
        elif item in names:
            hits = {item}
        else:
            raise _not_found(item, names)
        chosen |= hits
    order = {n: i for i, n in enumerate(["", *names])}
    return sorted(chosen, key=order.__getitem__)


def _check_sites(sites: Sequence[str] | str) -> tuple[str, ...]:
    sites = (sites,) if isinstance(sites, str) else tuple(sites)
    bad = [s for s in sites if s not in SITES]
    if bad or not sites:
        raise InvalidArgumentError(f"sites must be some of {SITES}, got {sites!r}")
    return sites


def site_key(module: str, side: str, call: int) -> str:
    if module == "":
        return "input"
    key = module if side == "output" else f"{module}:input"
    return key if call == 0 else f"{key}:{call}"


def _check_key(key: str) -> None:
    problem = name_problem(key)
    if problem is not None:
        raise InvalidArgumentError(
            f"layer {key!r} cannot name an array inside the store: {problem}; rename the "
            f"module, or leave it out of `layers`"
        )


Sink = Callable[[Site, torch.Tensor], None]


@contextmanager
def hooked(model: nn.Module, modules: Iterable[str], sides: Sequence[str], sink: Sink):
    """Hook ``sides`` of ``modules`` (``""`` = model input) for the duration of the block.

    ``sink(site, tensor)`` sees every call. The model is put in eval mode; every module's
    training flag is restored and every hook removed on exit, also when forward raised.
    """
    sides = _check_sites(sides)
    by_name = dict(model.named_modules())
    calls: dict[tuple[str, str], int] = {}
    handles = []
    # where the forward pass is, for the note on an error raised inside the model
    pos: dict = {"forward": False, "last": None, "shape": None}

    def emit(name: str, side: str, value) -> None:
        if not isinstance(value, torch.Tensor):
            where = "model input" if name == "" else f"{side} of layer {name!r}"
            raise ProbeEngineError(
                f"the {where} is a {type(value).__name__}, not a tensor; probe a submodule "
                f"that returns one tensor instead"
            )
        k = calls.get((name, side), 0)
        calls[(name, side)] = k + 1
        site = Site(site_key(name, side, k), name, side, k)
        sink(site, value)
        pos["last"] = site.key

    def reset(_module, args) -> None:
        calls.clear()
        x = args[0] if args else None
        pos.update(forward=True, last=None,
                     shape=tuple(x.shape) if isinstance(x, torch.Tensor) else None)

    def done(_module, _args, _output) -> None:
        pos["forward"] = False

    def make_pre(name: str):
        def pre(_module, args, kwargs):
            value = args[0] if args else next(iter(kwargs.values()), None)
            emit(name, "input", value)

        return pre

    def make_post(name: str):
        def post(_module, _args, output):
            emit(name, "output", output)

        return post

    training = {n: m.training for n, m in by_name.items()}
    try:
        # registered first so that it runs before the model-input pre-hook
        handles.append(model.register_forward_pre_hook(reset))
        handles.append(model.register_forward_hook(done))
        for name in modules:
            if name == "":
                handles.append(model.register_forward_pre_hook(make_pre(""), with_kwargs=True))
                continue
            module = by_name[name]
            if "input" in sides:
                handles.append(module.register_forward_pre_hook(make_pre(name), with_kwargs=True))
            if "output" in sides:
                handles.append(module.register_forward_hook(make_post(name)))
        model.eval()
        yield
    except Exception as exc:
        if pos["forward"] and not isinstance(exc, ProbeEngineError):
            shape = f" on an input batch of shape {pos['shape']}" if pos["shape"] else ""
            after = (f"after the probe site {pos['last']!r}" if pos["last"]
                     else "before any probe site ran")
            exc.add_note(f"probe-engine: the model's forward pass raised this{shape}, "
                         f"{after}; the probe hooks are removed and every module's training "
                         f"flag is restored")
        raise
    finally:
        for h in handles:
            h.remove()
        for n, m in by_name.items():
            m.training = training[n]


def discover_sites(
    model: nn.Module, modules: list[str], sides: Sequence[str], forward: Callable[[], None]
) -> list[tuple[Site, tuple[int, ...]]]:
    """Run ``forward`` once with recording hooks: every site in firing order with its
    per-row shape. Modules that never run are an error."""
    seen: dict[tuple[str, str, int], tuple[Site, tuple[int, ...]]] = {}

    def record(site: Site, t: torch.Tensor) -> None:
        seen.setdefault((site.module, site.side, site.call), (site, tuple(t.shape[1:])))

    try:
        with hooked(model, modules, sides, record):
            forward()
    except Exception as exc:
        if not isinstance(exc, ProbeEngineError):
            exc.add_note("probe-engine: this was the first forward pass, on the first rows of "
                         "the first split, to find the probe sites and their shapes; nothing "
                         "was written. Check that the data fits the model (input shape, "
                         "channels, dtype, device).")
        raise
    ran = {s.module for s, _ in seen.values()}
    idle = [m for m in modules if m not in ran]
    if idle:
        raise LayerNotFoundError(
            f"layer(s) {idle} never ran in the model's forward pass, so there is nothing to "
            f"probe there; leave them out of `layers`"
        )
    for site, _ in seen.values():
        _check_key(site.key)
    keys = [s.key for s, _ in seen.values()]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise ProbeEngineError(f"two sites share the key(s) {sorted(dup)}; rename a module")
    return list(seen.values())
