"""probe-engine: linear classifier probes (Alain & Bengio, 2016) for real models and data.

    store = engine.build_store(model, data, "probes.zarr")   # capture -> Zarr v3 store
    store = engine.open_store("probes.zarr")
"""

from . import datasets, metrics, models, text
from .build import build_store
from .errors import (
    DataError,
    DatasetNotFoundError,
    InvalidArgumentError,
    LabelNotFoundError,
    LayerNotFoundError,
    MemoryBudgetError,
    MissingDependencyError,
    NonFiniteError,
    ProbeEngineError,
    ProbeEngineWarning,
    ReductionError,
    ReportError,
    RunNotFoundError,
    SplitNotFoundError,
    StoreCorruptedError,
    StoreError,
    StoreExistsError,
    StoreLockedError,
    StoreMismatchError,
)
from .report import report
from .results import ProbeResults
from .schedule import cluster
from .solve import solve
from .store import Store, VerifyReport, load_results, open_store
from .sweep import sweep
from .text import TextDataset

__version__ = "0.1.0"

__all__ = [
    "cluster",
    "report",
    "sweep",
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
    "ProbeResults",
    "ReductionError",
    "ReportError",
    "RunNotFoundError",
    "SplitNotFoundError",
    "Store",
    "StoreCorruptedError",
    "StoreError",
    "StoreExistsError",
    "StoreLockedError",
    "StoreMismatchError",
    "TextDataset",
    "VerifyReport",
    "build_store",
    "datasets",
    "load_results",
    "metrics",
    "models",
    "open_store",
    "solve",
    "text",
]
