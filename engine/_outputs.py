"""Which tensor of a layer's input or output is its probe site's activation.

A module may return a tensor, or a structure holding several: a tuple or list (PyTorch's
``MultiheadAttention``: ``(output, weights)``), a dict, or a Hugging Face ``ModelOutput`` (an
ordered dict whose values are also reachable by position). Without a selector, the site is
the structure's ``last_hidden_state``, else its ``hidden_states`` when that is a tensor, else
its first floating-point tensor; a selector (an int position or a str key) picks exactly
one. Nothing here imports ``transformers``: a ``ModelOutput`` is a ``Mapping``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import InvalidArgumentError, LayerNotFoundError, ProbeEngineError

__all__ = ["DEFAULT_KEYS", "describe", "pick", "check_select", "selectors"]

#: keys a mapping's activation is looked up by first, in this order
DEFAULT_KEYS = ("last_hidden_state", "hidden_states")

Selector = int | str


def describe(value: Any, depth: int = 0) -> str:
    """A short picture of a structure: ``tuple(Tensor[2, 5, 64] float32, None)``."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"Tensor[{', '.join(map(str, value.shape))}] {dtype}"
    if value is None:
        return "None"
    if depth >= 2:
        return type(value).__name__
    if isinstance(value, Mapping):
        items = [f"{k!r}: {describe(v, depth + 1)}" for k, v in list(value.items())[:6]]
        more = ", ..." if len(value) > 6 else ""
        return f"{type(value).__name__}({{{', '.join(items)}{more}}})"
    if isinstance(value, (tuple, list)):
        items = [describe(v, depth + 1) for v in value[:6]]
        more = ", ..." if len(value) > 6 else ""
        return f"{type(value).__name__}({', '.join(items)}{more})"
    return type(value).__name__


def _floating(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _default(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        for key in DEFAULT_KEYS:
            if _floating(value.get(key)):
                return value[key]
        return next((v for v in value.values() if _floating(v)), None)
    if isinstance(value, (tuple, list)):
        return next((v for v in value if _floating(v)), None)
    return None


def _selected(value: Any, selector: Selector) -> Any:
    if isinstance(selector, int):
        if isinstance(value, Mapping) and not hasattr(value, "to_tuple"):
            return list(value.values())[selector]  # a plain dict: by insertion order
        return value[selector]  # a sequence; a ModelOutput indexes its non-None values
    if isinstance(value, Mapping):
        return value[selector]
    return getattr(value, selector)


def pick(value: Any, selector: Selector | None, where: str) -> torch.Tensor:
    """The activation of a site in ``value`` (what a module got or returned): ``selector``'s
    element, else the default (module docstring). ``where`` names the site in errors."""
    if selector is None:
        out = _default(value)
        if out is None:
            raise ProbeEngineError(
                f"the {where} is {describe(value)}: no floating-point tensor (nor a "
                f"{' or '.join(map(repr, DEFAULT_KEYS))} key) to probe; pick one with "
                f"select={{layer: index or key}}, or probe a submodule that returns a tensor")
        return out
    try:
        out = _selected(value, selector)
    except (IndexError, KeyError, AttributeError, TypeError):
        out = None
        found = "has no such element"
    else:
        found = f"holds {describe(out)} there"
    if not isinstance(out, torch.Tensor):
        raise ProbeEngineError(
            f"select={selector!r} names no tensor of the {where}: it is {describe(value)} and "
            f"{found}; choose an index or key of a tensor")
    return out


def check_select(value: Any, name: str = "select") -> dict[str, Selector]:
    """``select=``: None, or a mapping of module name / glob -> int position or str key."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgumentError(f"{name} must be a dict of layer -> index or key (e.g. "
                                   f"{{'encoder.layer.*': 0}}), not a {type(value).__name__}")
    for key, sel in value.items():
        if not isinstance(key, str):
            raise InvalidArgumentError(f"{name}: key {key!r} is not a layer name or glob")
        if isinstance(sel, bool) or not isinstance(sel, (int, str)):
            raise InvalidArgumentError(f"{name}[{key!r}] is {sel!r}; give an int position or "
                                       f"a str key of the layer's output")
    return dict(value)


def selectors(select: Mapping[str, Selector], modules: Sequence[str]) -> dict[str, Selector]:
    """Each of ``modules``' selector: its own entry in ``select``, else the first glob that
    matches it. Every entry must pick one of ``modules`` (a misspelt name is an error)."""
    out: dict[str, Selector] = {}
    for name in modules:
        own = name or "input"
        if own in select:
            out[name] = select[own]
            continue
        hit = next((p for p in select if fnmatch.fnmatchcase(name or "input", p)), None)
        if hit is not None:
            out[name] = select[hit]
    for key in select:
        if not any(fnmatch.fnmatchcase(m or "input", key) for m in modules):
            names = ", ".join(repr(m or "input") for m in modules[:10])
            raise LayerNotFoundError(f"select: key {key!r} matches no probed layer (they are "
                                     f"{names}{', ...' if len(modules) > 10 else ''}); fix "
                                     f"the key, or add the layer to `layers`")
    return out
