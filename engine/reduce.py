"""Reductions: turn one layer's activation (B, *shape) into a (B, D) feature matrix.

A reduction is resolved once per layer from its spec, the layer's per-row shape and its
*layout* (which axis holds the channels: :mod:`engine.capture` tells conv maps, channels
first, from token sequences, channels last), then applied to every batch inside the forward
hook, on the model's device, before anything is copied to the host. Specs:

- ``"none"``: flatten, D = prod(shape).
- ``"pool"``: per-channel global average, D = C: over every axis after the channel axis of
  a channels-first map (the paper's ResNet-50 probes), over the tokens of a (T, D) sequence
  (then the same as ``"tokens:mean"``).
- ``"pool:HxW"``: adaptive 2-D average pooling of a (C, H', W') map to (C, H, W), D = C*H*W.
- ``"subsample:K"``: a fixed random set of K flattened features, the same for every batch,
  drawn from a generator seeded by (seed, layer key) and stored with the features so that
  the choice is reproducible and inspectable (the paper's Inception v3 probes).
- ``"tokens:mean"`` / ``"tokens:max"``: the mean / maximum of a (T, D) sequence's tokens,
  padding excluded (the batch's attention mask), D = D; ``"tokens:cls"``: token 0 (a ViT's or
  BERT's class token); ``"tokens:first"`` / ``"tokens:last"``: the first / last token that
  is not padding. Sequences may differ in length from batch to batch. ``"tokens:each"``
  (every layer of a store of token rows): each stored token's (D,) vector, one row each.
- ``"auto"``: a token sequence gets ``"tokens:mean"``; anything else ``"none"`` while D <=
  ``max_features``, otherwise conv maps are pooled to the finest square grid that fits
  (preferring, within a factor of two, a grid whose windows tile the map exactly; down to a
  global ``"pool"``), anything else is subsampled.

A (T, D) or (C, L) row whose layout is not known is never guessed: ``"pool"`` and ``"auto"``
raise, naming the layer, until a per-layer spec says which it is.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import LayerNotFoundError, ReductionError

__all__ = ["Reduction", "resolve_reduction", "resolve_reductions", "parse_reduction",
           "check_reduce", "check_reduce_keys", "spec_for"]

_POOL_GRID = re.compile(r"pool:([0-9]+)x([0-9]+)")
_SUBSAMPLE = re.compile(r"subsample:([0-9]+)")
#: the reductions of a token sequence (B, T, D) -> (B, D); "each" (a store of token rows
#: only): (B, T, D) -> (stored tokens, D)
TOKEN_MODES = ("mean", "max", "cls", "first", "last", "each")
#: layouts of a per-row activation: conv maps ((C, L), (C, H, W)) and token sequences (T, D)
CHANNELS_FIRST, TOKENS = "channels_first", "tokens"


def parse_reduction(spec: str) -> tuple[str, tuple]:
    """Split a spec into (kind, params): ``"pool:4x4"`` -> ``("pool", (4, 4))``,
    ``"tokens:mean"`` -> ``("tokens", ("mean",))``."""
    if not isinstance(spec, str):
        raise ReductionError(f"a reduction is a string such as 'pool' or 'subsample:1000', "
                             f"not {spec!r}")
    if spec in ("none", "pool", "auto"):
        return spec, ()
    if m := _POOL_GRID.fullmatch(spec):
        h, w = int(m[1]), int(m[2])
        if h < 1 or w < 1:
            raise ReductionError(f"reduction {spec!r}: the pooled grid must be at least 1x1")
        return "pool", (h, w)
    if m := _SUBSAMPLE.fullmatch(spec):
        k = int(m[1])
        if k < 1:
            raise ReductionError(f"reduction {spec!r}: K must be at least 1")
        return "subsample", (k,)
    kind, _, mode = spec.partition(":")
    if kind == "tokens":
        if mode not in TOKEN_MODES:
            raise ReductionError(f"reduction {spec!r}: use one of "
                                 f"{', '.join('tokens:' + m for m in TOKEN_MODES)}")
        return "tokens", (mode,)
    raise ReductionError(
        f"unknown reduction {spec!r}; use 'none', 'pool', 'pool:HxW', 'subsample:K', "
        f"'tokens:mean' (or :max, :cls, :first, :last) or 'auto'"
    )


def check_reduce(reduce) -> None:
    """Check ``build_store``'s ``reduce=`` before anything runs: a spec, or a dict of layer
    key / module name / glob -> spec, every spec well-formed."""
    if isinstance(reduce, str):
        parse_reduction(reduce)
        return
    if not isinstance(reduce, Mapping):
        raise ReductionError(f"reduce must be a spec such as 'pool' or a dict of layer -> "
                             f"spec, not a {type(reduce).__name__}")
    for key, spec in reduce.items():
        if not isinstance(key, str):
            raise ReductionError(f"reduce: key {key!r} is not a layer name or glob")
        try:
            parse_reduction(spec)
        except ReductionError as exc:
            raise ReductionError(f"reduce[{key!r}]: {exc}") from None


def check_reduce_keys(reduce, sites: Iterable) -> None:
    """Every key of a ``reduce`` dict must pick at least one probe site (by its key, its
    module's name or a glob over keys), so that a misspelt layer is not silently reduced
    by ``"auto"``. ``sites``: the :class:`~engine.capture.Site` objects found."""
    if isinstance(reduce, str):
        return
    sites = list(sites)
    names = {s.key for s in sites} | {s.module or "input" for s in sites}
    for key in reduce:
        if key in names or any(fnmatch.fnmatchcase(s.key, key) for s in sites):
            continue
        near = difflib.get_close_matches(key, sorted(names), n=3, cutoff=0.5)
        hint = f"closest: {', '.join(map(repr, near))}" if near else (
            f"the probe sites are {', '.join(map(repr, sorted(names)[:10]))}")
        raise LayerNotFoundError(f"reduce: key {key!r} matches no probe site ({hint}); "
                                 f"fix the key, or add the layer to `layers`")


@dataclass(eq=False)
class Reduction:
    """A resolved reduction of one layer: ``reduction(t, mask)`` maps (B, *in_shape) to
    (B, dim); ``mask`` (B, T), nonzero at real tokens, matters to ``tokens:*`` only.

    ``indices`` (int64, sorted) are the kept flat feature indices of a subsample reduction;
    ``key`` names the layer in errors. A token reduction takes any sequence length T (its
    ``in_shape`` is the first batch's); every other one, exactly ``in_shape``.
    """

    spec: str
    in_shape: tuple[int, ...]
    dim: int
    indices: np.ndarray | None = None
    key: str = ""
    _device_indices: dict[torch.device, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.kind, self.params = parse_reduction(self.spec)

    def __call__(self, t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "tokens":
            return self._tokens(t, mask)
        if tuple(t.shape[1:]) != self.in_shape:
            raise ReductionError(
                f"layer {self.key!r}: rows of shape {tuple(t.shape[1:])} in this batch, "
                f"{self.in_shape} in the first; a sequence whose length varies needs a token "
                f"reduction (reduce={{{self.key!r}: 'tokens:mean'}}, or :cls, :last, ...), or "
                f"inputs padded to one length")
        if self.kind == "none":
            return t.flatten(1)
        if self.kind == "pool":
            if not self.params:
                return t.flatten(2).mean(dim=2)
            (h, w), (ih, iw) = self.params, self.in_shape[1:]
            if ih % h or iw % w:
                return F.adaptive_avg_pool2d(t, self.params).flatten(1)
            if t.device.type == "cpu" and t.is_contiguous():
                return tile_mean(t, ih // h, iw // w).flatten(1)
            return F.avg_pool2d(t, (ih // h, iw // w)).flatten(1)
        idx = self._device_indices.get(t.device)
        if idx is None:
            idx = torch.from_numpy(self.indices).to(t.device)
            self._device_indices[t.device] = idx
        return t.flatten(1).index_select(1, idx)

    def _tokens(self, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, D) -> (B, D), padding (``mask`` == 0) excluded."""
        if t.ndim != 3 or t.shape[2] != self.dim:
            raise ReductionError(
                f"layer {self.key!r}: {self.spec!r} needs (batch, tokens, {self.dim}) "
                f"activations, this batch's are {tuple(t.shape)}")
        (mode,), (b, n, _) = self.params, t.shape
        if mode == "cls":
            return t[:, 0]
        if mode == "each" and mask is None:
            raise ReductionError(f"layer {self.key!r}: 'tokens:each' needs the mask of the "
                                 f"tokens to store (a store of rows='tokens')")
        if mask is not None and tuple(mask.shape) != (b, n):
            raise ReductionError(
                f"layer {self.key!r}: the attention mask is {tuple(mask.shape)} but the "
                f"layer has {b} rows of {n} tokens; a layer that adds or drops tokens cannot "
                f"use the input's mask: use 'tokens:cls' there, or probe another layer")
        if mode == "each":  # the stored tokens, item by item, in position order
            return t[mask != 0]
        if mode == "mean":
            if mask is None:
                return t.mean(dim=1)
            m = mask.to(t.dtype).unsqueeze(2)
            return (t * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)
        if mode == "max":
            if mask is None:
                return t.amax(dim=1)
            return t.masked_fill(mask.unsqueeze(2) == 0, float("-inf")).amax(dim=1)
        if mask is None:
            at = torch.full((b,), 0 if mode == "first" else n - 1, device=t.device)
        else:  # argmax returns the first of equal values: the first / last real token
            real = (mask != 0).to(torch.uint8)
            at = (real.argmax(dim=1) if mode == "first"
                  else n - 1 - real.flip(1).argmax(dim=1))
        return t[torch.arange(b, device=t.device), at]

    def to_json(self) -> dict:
        return {"spec": self.spec, "in_shape": list(self.in_shape), "dim": self.dim}


def tile_mean(t: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Means of the (kh, kw) tiles of a contiguous (B, C, H, W) tensor, by strided adds.

    The same values as ``avg_pool2d(t, (kh, kw))`` (up to summation order), faster on the CPU,
    where avg_pool2d's NCHW kernel is slow and the hooks run on every batch (benchmarks/
    RESULTS.md, "Capture").
    """
    b, c, h, w = t.shape
    cols = t.view(b, c, h, w // kw, kw)
    acc = cols[..., 0] + cols[..., 1] if kw > 1 else cols[..., 0].clone()
    for j in range(2, kw):
        acc += cols[..., j]
    rows = acc.view(b, c, h // kh, kh, w // kw)
    out = rows[:, :, :, 0] + rows[:, :, :, 1] if kh > 1 else rows[:, :, :, 0].clone()
    for i in range(2, kh):
        out += rows[:, :, :, i]
    return out.mul_(1.0 / (kh * kw))


def subsample_indices(n_features: int, k: int, seed: int, key: str) -> np.ndarray:
    """K distinct sorted flat indices out of ``n_features``, a pure function of (seed, key)."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    return np.sort(rng.choice(n_features, size=k, replace=False)).astype(np.int64)


def _auto_spec(in_shape: tuple[int, ...], max_features: int) -> str:
    dim = math.prod(in_shape)
    if dim <= max_features:
        return "none"
    if len(in_shape) == 3 and in_shape[0] <= max_features:
        c, h, w = in_shape
        s = math.isqrt(max_features // c)
        # the finest square grid that fits, preferring one whose windows tile the map exactly
        exact = [g for g in range(s, 0, -1) if h % g == 0 and w % g == 0]
        g = exact[0] if exact and exact[0] * 2 > s else s
        gh, gw = min(g, h), min(g, w)
        return "pool" if gh * gw == 1 else f"pool:{gh}x{gw}"
    if len(in_shape) >= 2 and in_shape[0] <= max_features and len(in_shape) != 3:
        return "pool"
    return f"subsample:{max_features}"


def _ambiguous(key: str, in_shape: tuple[int, ...], spec: str) -> ReductionError:
    return ReductionError(
        f"layer {key!r}: its rows {in_shape} may be (tokens, channels) or (channels, length), "
        f"and its module does not say which, so {spec!r} would have to guess the channel "
        f"axis; give it a spec of its own: reduce={{{key!r}: 'tokens:mean'}} (or :cls, :last, "
        f"...) for a token sequence, {{{key!r}: 'pool'}} for a channels-first map, or 'none'")


def resolve_reduction(
    spec: str, in_shape: tuple[int, ...], *, key: str, max_features: int, seed: int,
    strict: bool = True, layout: str | None = None,
) -> Reduction:
    """Resolve ``spec`` for a layer whose per-row activation shape is ``in_shape``.

    ``key`` names the layer in error messages and seeds subsample draws; ``layout``
    (:data:`CHANNELS_FIRST`, :data:`TOKENS` or None: unknown) says where its channels are.
    With ``strict=False`` (one spec given for every layer), a spec that does not fit a
    layer adapts: pooling a layer that has no spatial axes keeps it whole, a token
    reduction pools a conv map. With ``strict`` (a spec for this layer), ``"pool"`` of a
    (C, L) row of unknown layout takes the channels first, as it does a conv map's.
    """
    in_shape = tuple(int(s) for s in in_shape)
    n = math.prod(in_shape)
    if n == 0:
        raise ReductionError(f"layer {key!r} has zero features (shape {in_shape}); "
                             f"leave it out of `layers`")
    given = spec
    kind, params = parse_reduction(spec)
    rank2 = len(in_shape) == 2
    sequence = rank2 and layout == TOKENS
    if kind == "auto":
        if max_features < 1:
            raise ReductionError(f"max_features must be at least 1, not {max_features}")
        if sequence:
            spec = "tokens:mean"
        elif layout == TOKENS and len(in_shape) > 2:  # channels last: never pool axis 0
            spec = "none" if n <= max_features else f"subsample:{max_features}"
        else:
            spec = _auto_spec(in_shape, max_features)
        kind, params = parse_reduction(spec)
        if kind == "pool" and rank2 and layout is None:
            raise _ambiguous(key, in_shape, given)
    if kind == "tokens" and not strict and not (rank2 and layout != CHANNELS_FIRST):
        if len(in_shape) < 2:  # one spec for all layers: fit it to this one
            return Reduction("none", in_shape, n, key=key)
        kind, params = "pool", ()
    if kind == "tokens":
        if not rank2 or layout == CHANNELS_FIRST:
            what = "a channels-first map" if layout == CHANNELS_FIRST else "not a sequence"
            raise ReductionError(
                f"layer {key!r}: {spec!r} needs (tokens, channels) rows; its rows {in_shape} "
                f"are {what}: use 'pool' or 'none' for it")
        return Reduction(spec, in_shape, in_shape[1], key=key)
    if kind == "pool" and layout == TOKENS and len(in_shape) > 2:
        raise ReductionError(
            f"layer {key!r}: its rows {in_shape} hold their channels last (its module works "
            f"on the last axis), so {spec!r}, which averages the axes after the first, does "
            f"not fit; use 'none' or 'subsample:K' for it")
    if kind == "pool" and rank2 and layout != CHANNELS_FIRST:
        if sequence and (not params or not strict):
            return Reduction("tokens:mean", in_shape, in_shape[1], key=key)
        if layout is None and not strict:
            raise _ambiguous(key, in_shape, given)
    if kind == "none":
        return Reduction("none", in_shape, n, key=key)
    if kind == "pool" and not strict:  # one spec for all layers: fit it to this one
        if len(in_shape) < 2:
            return Reduction("none", in_shape, n, key=key)
        if params and len(in_shape) != 3:
            return Reduction("pool", in_shape, in_shape[0], key=key)
    if kind == "pool":
        if len(in_shape) < 2:
            raise ReductionError(
                f"layer {key!r} has per-row shape {in_shape}, with no spatial axes to pool; "
                f"use 'none' or 'subsample:K' for it (reduce={{{key!r}: ...}})"
            )
        if not params:
            return Reduction("pool", in_shape, in_shape[0], key=key)
        if len(in_shape) != 3:
            raise ReductionError(
                f"layer {key!r}: 'pool:HxW' needs a (C, H, W) map, its rows are {in_shape}; "
                f"use 'pool' for a global average"
            )
        h, w = params
        if h > in_shape[1] or w > in_shape[2]:
            raise ReductionError(
                f"layer {key!r}: grid {h}x{w} is finer than its {in_shape[1]}x{in_shape[2]} "
                f"map; use a grid of at most the map's size, or 'none'"
            )
        return Reduction(f"pool:{h}x{w}", in_shape, in_shape[0] * h * w, key=key)
    (k,) = params
    if k > n:
        raise ReductionError(
            f"layer {key!r} has {n} features, fewer than the {k} that {spec!r} keeps; "
            f"use 'none' or a smaller K"
        )
    return Reduction(f"subsample:{k}", in_shape, k, subsample_indices(n, k, seed, key),
                     key=key)


def spec_for(reduce: str | Mapping[str, str], site: Any) -> str:
    """The spec ``reduce`` gives one probe site: the spec itself, or the dict's entry for the
    site's key, its module's name, or the first glob over keys that matches; else "auto"."""
    if isinstance(reduce, str):
        return reduce
    for key in (site.key, site.module or "input"):
        if key in reduce:
            return reduce[key]
    for pattern, spec in reduce.items():
        if fnmatch.fnmatchcase(site.key, pattern):
            return spec
    return "auto"


def resolve_reductions(reduce: str | Mapping[str, str], found: Sequence[tuple[Any, tuple]], *,
                       max_features: int, seed: int) -> dict[str, Reduction]:
    """Every found ``(site, per-row shape)``'s reduction, by site key (a site's ``layout``,
    where it has one, places its channels). One spec for every layer adapts to each (pooling
    a layer without spatial axes keeps it whole); a dict's specs are taken as given, and
    each of its keys must pick a site."""
    check_reduce(reduce)
    check_reduce_keys(reduce, [site for site, _ in found])
    return {site.key: resolve_reduction(spec_for(reduce, site), shape, key=site.key,
                                        max_features=max_features, seed=seed,
                                        strict=not isinstance(reduce, str),
                                        layout=getattr(site, "layout", None))
            for site, shape in found}
