"""Device names -> torch devices, with errors that say what exists."""

from __future__ import annotations

import torch

from .errors import InvalidArgumentError


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; a device that does not exist -> error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InvalidArgumentError(f"device {device!r} is not a torch device: {exc}") from None
    if dev.type == "cuda" and (not torch.cuda.is_available()
                               or (dev.index or 0) >= torch.cuda.device_count()):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise InvalidArgumentError(f"device {device!r} does not exist here ({n} CUDA "
                                   f"device(s)); use device='cpu' or 'auto'")
    return dev
