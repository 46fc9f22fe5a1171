"""Capture: choose probe sites in a model, hook them, and run the model.

A *site* is one side ("input" or "output") of one call of one module. Its *key* names its
arrays in the store: ``"input"`` for the model's own input, ``"<module>"`` for a module's
output, ``"<module>:input"`` for its input, and a ``":<k>"`` suffix for the k-th extra call of
a module that runs several times in one forward (ResNet blocks reuse one ReLU three times).

:class:`Capture` is the one capture loop (hooks -> reduce -> a batch of site tensors), used
by ``build_store`` (which copies straight into its store blocks), by the shard tasks of a
Dask build, and by :class:`engine.callbacks.ProbeMonitor`. Hooks reduce and copy their
tensor at once, so that an in-place operation later in the network (``ReLU(inplace=True)``)
cannot change what was captured, and they never change the model's outputs.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn.modules.activation import MultiheadAttention
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.pooling import (
    _AdaptiveAvgPoolNd,
    _AdaptiveMaxPoolNd,
    _AvgPoolNd,
    _LPPoolNd,
    _MaxPoolNd,
)

from ._devices import resolve_device
from ._outputs import Selector, pick
from .errors import InvalidArgumentError, LayerNotFoundError, ProbeEngineError
from .format import name_problem
from .options import check_sites
from .reduce import CHANNELS_FIRST, TOKENS, Reduction

__all__ = ["Site", "select_modules", "discover_sites", "hooked", "is_auto_type", "Runner",
           "Capture", "model_device", "layout_of", "StopForward"]

_POOLING = (_MaxPoolNd, _AvgPoolNd, _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _LPPoolNd)
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Site:
    """One probe site: ``side`` ("input"/"output") of call ``call`` of module ``module``."""

    key: str
    module: str
    side: str
    call: int = 0
    layout: str | None = None  # CHANNELS_FIRST, TOKENS or None (unknown): see layout_of


class StopForward(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a hook once every probe site of a batch has run: the rest of the forward
    pass computes nothing a probe needs (:class:`Capture`)."""


def is_auto_type(m: nn.Module) -> bool:
    """Conv, linear, activation and pooling modules: the sites of the paper's Fig. 2."""
    if isinstance(m, (_ConvNd, nn.Linear, *_POOLING)):
        return True
    return type(m).__module__ == "torch.nn.modules.activation" and not isinstance(
        m, MultiheadAttention
    )


_CHANNELS_FIRST_TYPES = (_ConvNd, *_POOLING, _BatchNorm, _InstanceNorm, nn.GroupNorm,
                         nn.Upsample)
_TOKEN_TYPES = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.RMSNorm, nn.Embedding,
                MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer)
#: modules (by their Python module) whose activations are token sequences (B, T, D)
_TOKEN_MODULES = ("transformers.", "torchvision.models.vision_transformer")


def _own_layout(m: nn.Module) -> str | None:
    if isinstance(m, _CHANNELS_FIRST_TYPES):
        return CHANNELS_FIRST
    if isinstance(m, _TOKEN_TYPES):
        return TOKENS
    cls = type(m)
    if cls.__module__.startswith(_TOKEN_MODULES):
        # transformers' conv front ends (wav2vec2, whisper) are channels first; its
        # Conv1D (GPT-2) is a linear layer
        return CHANNELS_FIRST if "Conv" in cls.__name__ and cls.__name__ != "Conv1D" else TOKENS
    return None


def layout_of(model: nn.Module, name: str) -> str | None:
    """Where the channels of module ``name``'s activations are: :data:`CHANNELS_FIRST`
    (conv, pooling, batch norm: (C, L), (C, H, W)), :data:`TOKENS` (linear, layer norm,
    attention, transformer blocks, every ``transformers`` module and torchvision's ViT:
    (T, D)), by its own type, else by its nearest ancestor's; None when nothing says."""
    by_name = dict(model.named_modules())
    parts = name.split(".") if name else []
    for n in range(len(parts), -1, -1):
        layout = _own_layout(by_name[".".join(parts[:n])])
        if layout is not None:
            return layout
    return None


def _not_found(what: str, names: list[str]) -> LayerNotFoundError:
    near = difflib.get_close_matches(what, names, n=5, cutoff=0.5)
    hint = f"closest: {', '.join(map(repr, near))}" if near else (
        f"the model has {len(names)} modules, e.g. {', '.join(map(repr, names[:8]))}"
    )
    return LayerNotFoundError(
        f"no module named {what!r} in the model; {hint}. Names are those of "
        f"model.named_modules(); 'input' means the model's input; globs like 'layer*.0' work."
    )


def select_modules(model: nn.Module, layers, inputs: Any = None) -> list[str]:
    """Resolve ``layers`` to module names in registration order (``""`` = the model input).

    ``layers``: ``"auto"``, or one or a list of exact names, glob patterns, module types,
    ``"input"`` (the model's input) and ``"auto"``. Given a batch of ``inputs``, ``"auto"``
    takes the model input only when it is a floating-point tensor (not token ids).
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
            floating = inputs is None or (isinstance(inputs, torch.Tensor)
                                          and inputs.is_floating_point())
            hits = {""} if floating else set()
            hits |= {n for n, m in named if is_auto_type(m)}
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
def hooked(model: nn.Module, modules: Iterable[str], sides: Sequence[str], sink: Sink,
           select: Mapping[str, Selector] | None = None):
    """Hook ``sides`` of ``modules`` (``""`` = model input) for the duration of the block.

    ``sink(site, tensor)`` sees every call: the tensor a module got (its first argument)
    or returned, or the one ``select[module]`` picks from a tuple, dict or ``ModelOutput``
    (default: :func:`engine._outputs.pick`). The model is put in eval mode; every module's
    training flag is restored and every hook removed on exit, also when forward raised.
    """
    sides = check_sites(sides)
    select = select or {}
    by_name = dict(model.named_modules())
    calls: dict[tuple[str, str], int] = {}
    handles = []
    # where the forward pass is, for the note on an error raised inside the model
    pos: dict = {"forward": False, "last": None, "shape": None}

    def emit(name: str, side: str, value) -> None:
        where = "model input" if name == "" else f"{side} of layer {name!r}"
        value = pick(value, select.get(name) if side == "output" or name == "" else None,
                     where)
        k = calls.get((name, side), 0)
        calls[(name, side)] = k + 1
        site = Site(site_key(name, side, k), name, side, k)
        try:
            sink(site, value)
        except StopForward:
            pos["forward"] = False
            raise
        pos["last"] = site.key

    def reset(_module, args, kwargs) -> None:
        calls.clear()
        x = args[0] if args else next(iter(kwargs.values()), None)
        pos.update(forward=True, last=None,
                   shape=tuple(x.shape) if isinstance(x, torch.Tensor) else None)

    def done(_module, _args, _output) -> None:
        pos["forward"] = False

    def make_pre(name: str):
        def pre(_module, args, kwargs):
            # the model's input may be all keywords (a transformers model's input_ids,
            # attention_mask, ...): then it is their dict
            value = (args[0] if args else dict(kwargs) if name == ""
                     else next(iter(kwargs.values()), None))
            emit(name, "input", value)

        return pre

    def make_post(name: str):
        def post(_module, _args, output):
            emit(name, "output", output)

        return post

    training = {n: m.training for n, m in by_name.items()}
    try:
        # registered first so that it runs before the model-input pre-hook
        handles.append(model.register_forward_pre_hook(reset, with_kwargs=True))
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
    model: nn.Module, modules: list[str], sides: Sequence[str], forward: Callable[[], None],
    select: Mapping[str, Selector] | None = None,
) -> list[tuple[Site, tuple[int, ...]]]:
    """Run ``forward`` once with recording hooks: every site in firing order with its
    per-row shape and layout. Modules that never run are an error.

    A site's layout is its module's (:func:`layout_of`); a site whose module says nothing
    (an activation, dropout) takes the layout of the last site before it, in firing order,
    whose rows had the same shape and a known layout (a ReLU after a Conv1d). The model's
    own input has no layout: its shape speaks for it.
    """
    seen: dict[tuple[str, str, int], tuple[Site, tuple[int, ...]]] = {}

    def record(site: Site, t: torch.Tensor) -> None:
        seen.setdefault((site.module, site.side, site.call), (site, tuple(t.shape[1:])))

    try:
        with hooked(model, modules, sides, record, select):
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
    found, last = [], {}  # last: per-row shape -> layout of the last site with one
    for site, shape in seen.values():
        layout = layout_of(model, site.module) if site.module else None
        if layout is None and site.module:
            layout = last.get(shape)
        elif layout is not None:
            last[shape] = layout
        found.append((replace(site, layout=layout), shape))
    return found


# -- running the model -------------------------------------------------------------------
_AUTOCAST = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_device(model: nn.Module, device: str | torch.device) -> torch.device:
    """``"auto"``: the model's device when it is not the CPU, else CUDA when available."""
    if device == "auto":
        params = list(model.parameters())
        if params and params[0].device.type != "cpu":
            return params[0].device
    return resolve_device(device)


class Runner:
    """Runs the model on ``device`` under inference mode, autocast and channels-last as
    asked. A model on one device is moved there and back (``with runner:``); a model spread
    over several devices (model parallel) stays where it is and gets its inputs on
    ``device``."""

    def __init__(self, model: nn.Module, device: str | torch.device = "auto",
                 autocast: str | None = None, channels_last: bool = False):
        self.model, self.device = model, model_device(model, device)
        self.channels_last = channels_last
        self.amp = _AUTOCAST[autocast]
        homes = {t.device for t in (*model.parameters(), *model.buffers())}
        #: the one device the model lives on (None: spread over several, or none)
        self.home = next(iter(homes)) if len(homes) == 1 else None
        #: whether ``with runner:`` moves the model to ``device`` and back
        self.moves = self.home is not None and self.home != self.device

    def __enter__(self) -> Runner:
        if self.moves:
            self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        return self

    def __exit__(self, *exc) -> None:
        if self.channels_last:
            self.model.to(memory_format=torch.contiguous_format)
        if self.moves:
            self.model.to(self.home)

    def forward(self, inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> None:
        """Run the model on a batch: ``model(inputs)``, or ``model(**inputs)`` for a dict
        of tensors (a tokenised text batch: ``input_ids``, ``attention_mask``, ...)."""
        amp = (torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None
               else nullcontext())
        if isinstance(inputs, Mapping):
            kwargs = {k: v.to(self.device, non_blocking=True)
                      if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            with torch.inference_mode(), amp:
                self.model(**kwargs)
            return
        x = inputs.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), amp:
            self.model(x)


class Capture:
    """The capture loop: hooks -> reduce -> one batch of site tensors.

    ``capture(batches)`` runs the model on each ``(inputs, labels)`` with every site hooked
    and yields ``(features, labels)``, ``features`` being ``{site key: (B, D) tensor}`` in
    ``dtype`` on the CPU. Callers that fill buffers of their own (``build_store`` writes
    straight into its store blocks) run ``with capture.hooked(): capture.batch(inputs,
    into)`` instead, where ``into(rows)`` gives the destination views of the next batch.

    Each site's reduction runs inside its hook, on the model's device, before anything
    crosses to the host; on CUDA the cast to ``dtype`` happens there too (half the bytes on
    the bus). A batch of dict inputs with an ``attention_mask`` gives token reductions
    their mask. Once the last site of a batch has run, the forward pass stops there
    (:class:`StopForward`): probing the first blocks of a deep model costs those blocks.
    With ``finite_sums``, each site's sum is kept per batch (:meth:`take_sums`):
    a sum is finite iff every term is, as long as it cannot overflow (float16 terms, below
    65504, are summed in float32, wider ones in float64), at a fraction of the cost of
    ``isfinite().all()``.
    """

    def __init__(self, runner: Runner, sites: Sequence[Site], reductions: Mapping[str, Reduction],
                 *, sides: Sequence[str] = ("output",), dtype: torch.dtype = torch.float32,
                 finite_sums: bool = False, select: Mapping[str, Selector] | None = None,
                 stop_early: bool = True):
        self.runner, self.sites, self.reductions = runner, list(sites), reductions
        self.select, self.stop_early = dict(select or {}), stop_early
        self._mask: torch.Tensor | None = None
        self.sides, self.dtype = check_sites(sides), dtype
        self.keys = [s.key for s in self.sites]
        self.cuda = runner.device.type == "cuda"
        self._acc = torch.float32 if dtype == torch.float16 else torch.float64
        self._finite_sums = finite_sums
        self._sums: list[tuple[str, torch.Tensor]] = []
        self._dest: Mapping[str, torch.Tensor] | None = None
        self._out: dict[str, torch.Tensor] = {}

    @contextmanager
    def hooked(self) -> Iterator[Capture]:
        """Hook the sites for the block (eval mode; every flag and hook restored after)."""
        modules = list(dict.fromkeys(s.module for s in self.sites))
        with hooked(self.runner.model, modules, self.sides, self._sink, self.select):
            yield self

    def _sink(self, site: Site, t: torch.Tensor) -> None:
        if site.key not in self.reductions:
            raise ProbeEngineError(
                f"site {site.key!r} ran in this batch but not in the first one (data-dependent "
                f"control flow); list the layers that always run in `layers`")
        out = self.reductions[site.key](t, self._mask)
        if self.cuda:
            out = out.to(self.dtype)
        if self._dest is not None:
            dest = self._dest[site.key]
        else:
            dest = torch.empty(out.shape, dtype=self.dtype, pin_memory=self.cuda)
        dest.copy_(out, non_blocking=True)  # now: later in-place ops cannot reach it
        self._out[site.key] = dest
        if self._finite_sums:
            self._sums.append((site.key, (out if self.cuda else dest).sum(dtype=self._acc)))
        if self.stop_early and len(self._out) == len(self.keys):
            raise StopForward

    def batch(self, inputs: torch.Tensor | Mapping[str, torch.Tensor],
              into: Callable[[int], Mapping[str, torch.Tensor]] | None = None,
              mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Run one batch (inside :meth:`hooked`): ``{key: (B, D)}``, the views ``into(B)``
        gave, else new tensors. With ``into``, copies from a GPU may still be in flight:
        synchronise before reading them; without, they are done. ``mask`` (B, T): the
        tokens the token reductions see (default: the inputs' ``attention_mask``)."""
        self._dest = None if into is None else into(_rows(inputs))
        self._out = {}
        if mask is None and isinstance(inputs, Mapping):
            mask = inputs.get("attention_mask")
        self._mask = None if mask is None else mask.to(self.runner.device, non_blocking=True)
        try:
            self.runner.forward(inputs)
        except StopForward:
            pass
        finally:
            self._dest, self._mask = None, None
        if len(self._out) != len(self.keys):
            raise ProbeEngineError(
                f"{len(self._out)} of the {len(self.keys)} probe sites ran in this batch "
                f"(data-dependent control flow); list the layers that always run in `layers`")
        if into is None and self.cuda:
            torch.cuda.current_stream(self.runner.device).synchronize()
        return self._out

    def take_sums(self) -> list[tuple[str, torch.Tensor]]:
        """(key, sum) of every site call since the last take (``finite_sums``)."""
        sums, self._sums = self._sums, []
        return sums

    def __call__(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                 ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        with self.hooked():
            for inputs, labels in batches:
                yield self.batch(inputs), labels


def _rows(inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> int:
    """The batch size of a tensor or of a dict of tensors (its first tensor's)."""
    if isinstance(inputs, Mapping):
        return len(next(v for v in inputs.values() if isinstance(v, torch.Tensor)))
    return len(inputs)
