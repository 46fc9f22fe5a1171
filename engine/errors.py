"""Error hierarchy of probe-engine.

Every error probe-engine raises derives from :class:`ProbeEngineError` *and* from the builtin
a caller would naturally catch (``KeyError`` for a missing name, ``OSError`` for store
problems, ...), so both ``except ProbeEngineError`` and ``except KeyError`` work. Warnings
derive from :class:`ProbeEngineWarning`.
"""

from __future__ import annotations

__all__ = [
    "DataError",
    "DatasetNotFoundError",
    "InvalidArgumentError",
    "MemoryBudgetError",
    "MissingDependencyError",
    "LabelNotFoundError",
    "LayerNotFoundError",
    "NonFiniteError",
    "ProbeEngineError",
    "ProbeEngineWarning",
    "ReductionError",
    "ReportError",
    "RunNotFoundError",
    "SplitNotFoundError",
    "StoreCorruptedError",
    "StoreError",
    "StoreExistsError",
    "StoreLockedError",
    "StoreMismatchError",
]


class ProbeEngineError(Exception):
    """Root of every probe-engine error."""


class ProbeEngineWarning(UserWarning):
    """Something a user should know that does not stop the work."""


def _plain_str(self: KeyError) -> str:
    # KeyError.__str__ repr-quotes a lone argument, which garbles multi-line messages.
    return str(self.args[0]) if len(self.args) == 1 else KeyError.__str__(self)


class LayerNotFoundError(ProbeEngineError, KeyError):
    """A probe site / layer name that the model or store does not have."""

    __str__ = _plain_str


class LabelNotFoundError(ProbeEngineError, KeyError):
    """A label set (targets) name that the store or dataset does not have."""

    __str__ = _plain_str


class SplitNotFoundError(ProbeEngineError, KeyError):
    """A data split (train / test / ...) that the store or dataset does not have."""

    __str__ = _plain_str


class StoreError(ProbeEngineError, OSError):
    """A path that is not a store, a read-only store, or another store I/O problem."""


class StoreExistsError(StoreError, FileExistsError):
    """A store already exists where a new one was to be created."""


class StoreCorruptedError(StoreError):
    """A store chunk that fails its checksum or cannot be decoded."""


class StoreLockedError(StoreError):
    """Another process is writing the store (one writer at a time)."""


class StoreMismatchError(ProbeEngineError, ValueError):
    """Resuming a store with another model, dataset or configuration than it was made with."""


class DataError(ProbeEngineError, ValueError):
    """Bad dataset items or labels, an empty dataset, or a malformed data file."""


class NonFiniteError(DataError):
    """NaN or infinite values in activations or inputs."""


class DatasetNotFoundError(ProbeEngineError, FileNotFoundError):
    """The files of a dataset cannot be found (or fetched) anywhere that was tried."""


class RunNotFoundError(ProbeEngineError, KeyError):
    """No saved probe run of that name in the store."""

    __str__ = _plain_str


class ReductionError(ProbeEngineError, ValueError):
    """A reduction spec that is malformed or does not fit the layer's shape."""


class ReportError(ProbeEngineError, OSError):
    """The report folder cannot be written."""


class InvalidArgumentError(ProbeEngineError, ValueError, TypeError):
    """An argument of the wrong type or value (unknown option, negative count, ...)."""


class MemoryBudgetError(InvalidArgumentError):
    """A memory budget (``max_memory=``) too small for the smallest unit of work."""


class MissingDependencyError(ProbeEngineError, ModuleNotFoundError):
    """An optional package a feature needs (safetensors, pyarrow) that is not installed."""
