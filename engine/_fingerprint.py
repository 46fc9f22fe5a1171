"""Fingerprints of a model, and the differences between two metadata records."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn


def model_fingerprint(model: nn.Module) -> dict:
    """{class, parameters, digest}: the digest covers every state_dict entry's name, dtype,
    shape and bytes, so any change of weights or architecture shows."""
    h = hashlib.blake2b(digest_size=16)
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            h.update(f"{name}={value!r};".encode())
            continue
        t = value.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(value.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    cls = type(model)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "digest": h.hexdigest(),
    }


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def differences(stored: dict, wanted: dict) -> list[str]:
    """Dotted paths whose values differ, with both values: ``["config.dtype: 'float16' in
    the store, 'float32' now"]``."""
    a, b = _flatten(stored), _flatten(wanted)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {a.get(key, '<absent>')!r} in the store, "
                       f"{b.get(key, '<absent>')!r} now")
    return out
