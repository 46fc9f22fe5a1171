"""Options: each one written once, with its default, its check and its help.

``build_store``, ``solve``, the stored configs, the Dask tasks and the ``probe-engine``
command line all derive from these dataclasses: the API checks its keyword arguments by
building one (an unknown or bad value raises :class:`InvalidArgumentError` naming it), the
Dask tasks ship the object itself, the store records :meth:`SolveOptions.config` /
:meth:`CaptureOptions.store_config`, and the CLI makes one flag per field
(:func:`add_arguments`, :func:`from_args`). ``tests/test_options.py`` checks that the API's
signatures and the CLI list every field, with the same defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._outputs import check_select
from ._precond import RANK
from ._tasks import CONTROLS, MDL_FRACTIONS
from .errors import InvalidArgumentError
from .format import COMPRESSORS, DTYPES, StoreConfig, check_name
from .reduce import check_reduce

__all__ = ["CaptureOptions", "LBFGSOptions", "SGDOptions", "SolveOptions", "DEFAULT_L2_GRID",
           "SITES", "check_sites", "l2_grid", "add_arguments", "from_args"]

#: lambda values tried by ``l2="auto"`` (per-row loss scale: sklearn C = 1 / (lambda * N))
DEFAULT_L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
#: the sides of a module a probe site can be on
SITES = ("input", "output")
#: solver arithmetic; "tf32": float32 with TF32 tensor-core GEMMs on CUDA (float32
#: elsewhere); "bfloat16" (SGD only): float32 weights, bfloat16 minibatch products
SOLVE_DTYPES = ("float32", "tf32", "float64", "bfloat16")


def option(default: Any, help: str, *, check: Callable[[Any, str], Any] | None = None,
           choices: Sequence[Any] | None = None, cli: Mapping[str, Any] | None = None) -> Any:
    """A dataclass field with its help text, its check (``check(value, name)`` returns the
    normalised value or raises :class:`InvalidArgumentError`) or ``choices``, and how the
    command line takes it (``cli``: argparse keywords, plus ``flag`` (its name), ``help``
    (other words than ``help``) and ``convert`` (a function of the parsed value))."""
    return field(default=default, metadata={"help": help, "check": check, "choices": choices,
                                            "cli": {} if cli is None else cli})


# -- checks ------------------------------------------------------------------------------
def _integer(value: Any, name: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise InvalidArgumentError(f"{name} must be an integer of at least {least}, not "
                                   f"{value!r}")
    return int(value)


def positive(value: Any, name: str) -> int:
    return _integer(value, name, 1)


def optional_positive(value: Any, name: str) -> int | None:
    return None if value is None else positive(value, name)


def integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"{name} must be an integer, not {value!r}")
    return int(value)


def positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            value > 0 and math.isfinite(value)):
        raise InvalidArgumentError(f"{name} must be a number above 0, not {value!r}")
    return float(value)


def flag(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, numbers.Integral)) or value not in (0, 1):
        raise InvalidArgumentError(f"{name} must be True or False, not {value!r}")
    return bool(value)


def check_sites(value: Any, name: str = "sites") -> tuple[str, ...]:
    """``"output"``, ``("input", "output")``, ... -> a tuple of sides."""
    sites = (value,) if isinstance(value, str) else tuple(value) if isinstance(
        value, Sequence) else (value,)
    if not sites or any(s not in SITES for s in sites):
        raise InvalidArgumentError(f"sites must be some of {SITES}, got {value!r}")
    return sites


def _reduce(value: Any, name: str) -> str | dict[str, str]:
    check_reduce(value)  # ReductionError names the bad spec
    return value if isinstance(value, str) else dict(value)


def _select(value: Any, name: str) -> dict[str, int | str] | None:
    return check_select(value, name) or None


def _valid_size(value: Any, name: str) -> int | float | str | None:
    ok = (value in ("auto", 0, None)
          or (isinstance(value, float) and 0 < value < 1)
          or (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0))
    if not ok:
        raise InvalidArgumentError(f"valid_size must be 'auto', a fraction in (0, 1) or a "
                                   f"row count, not {value!r}")
    return int(value) if isinstance(value, numbers.Integral) and value else value


def _one_of(allowed: Sequence[Any], words: str) -> Callable[[Any, str], Any]:
    def check(value: Any, name: str) -> Any:
        if value not in allowed:
            raise InvalidArgumentError(f"{name} must be {words}, not {value!r}")
        return value
    check.allowed = tuple(allowed)  # the command line's choices
    return check


def l2_grid(value: Any, name: str = "l2") -> tuple[float, ...]:
    """``"auto"`` -> :data:`DEFAULT_L2_GRID`; a number or numbers -> sorted distinct floats."""
    if isinstance(value, str):
        if value != "auto":
            raise InvalidArgumentError(f"l2 must be 'auto', a number or a list of numbers, "
                                       f"not {value!r}")
        return DEFAULT_L2_GRID
    values = [value] if isinstance(value, numbers.Real) else (
        list(value) if isinstance(value, Sequence) else [value])
    if not values or not all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                             and v >= 0 and math.isfinite(v) for v in values):
        raise InvalidArgumentError(f"l2 values must be finite and >= 0, got {value!r}")
    return tuple(float(v) for v in sorted(set(values)))


def _controls(value: Any, name: str) -> tuple[str, ...]:
    values = (value,) if isinstance(value, str) else tuple(value or ())
    if any(v not in CONTROLS for v in values) or len(set(values)) != len(values):
        raise InvalidArgumentError(f"{name} must be some of {CONTROLS}, each once, not "
                                   f"{value!r}")
    return values


def _shots(value: Any, name: str) -> tuple[int, ...]:
    values = (value,) if isinstance(value, numbers.Integral) else tuple(value or ())
    for v in values:
        positive(v, f"each of {name}")
    if list(values) != sorted(set(values)):
        raise InvalidArgumentError(f"{name} must be distinct row counts per class in "
                                   f"increasing order, not {value!r}")
    return tuple(int(v) for v in values)


def _fractions(value: Any, name: str) -> tuple[float, ...]:
    values = tuple(value) if isinstance(value, Sequence) else (value,)
    if not values or not all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                             and 0 < v <= 100 for v in values) \
            or list(values) != sorted(set(values)) or values[-1] != 100:
        raise InvalidArgumentError(f"{name} must be increasing percentages of train in "
                                   f"(0, 100] ending at 100, not {value!r}")
    return tuple(float(v) for v in values)


def _run_name(value: Any, name: str) -> str:
    return check_name(value, "run name")


def _device(value: Any, name: str) -> str:
    import torch

    if isinstance(value, torch.device):
        return str(value)
    if not isinstance(value, str):
        raise InvalidArgumentError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:1', ... or a "
                                   f"torch.device, not {value!r}")
    return value


# -- command-line parsing of the values argparse cannot check alone ----------------------
def _cli_l2(values: list[str]) -> str | list[float]:
    if values == ["auto"]:
        return "auto"
    if "auto" in values:
        raise InvalidArgumentError(f"{' '.join(values)}: give 'auto' alone, or numbers")
    try:
        return [float(v) for v in values]
    except ValueError:
        raise InvalidArgumentError(f"{' '.join(values)}: give 'auto' or numbers such as "
                                   f"1e-4") from None


def _cli_reduce(values: list[str]) -> str | dict[str, str]:
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    out = {}
    for v in values:
        key, sep, spec = v.rpartition("=")
        if not sep or not key:
            raise InvalidArgumentError(f"{v!r}: give one SPEC, or LAYER=SPEC pairs only "
                                       f"(e.g. --reduce 'layer*=pool' fc=none)")
        out[key] = spec
    return out


def _cli_select(values: list[str]) -> dict[str, int | str]:
    out: dict[str, int | str] = {}
    for v in values:
        key, sep, sel = v.rpartition("=")
        if not sep or not key or not sel:
            raise InvalidArgumentError(f"{v!r}: give LAYER=INDEX or LAYER=KEY pairs (e.g. "
                                       f"--select 'encoder.layer.*=0' pooler=pooler_output)")
        out[key] = int(sel) if sel.lstrip("-").isdigit() else sel
    return out


def _cli_valid_size(text: str) -> str | int | float:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give 'auto', a row count or a fraction "
                                         f"in (0, 1)") from None


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_bytes(text: str) -> int | None:
    """``67108864``, ``64M``, ``512k``, ``1G``, ``1.5GiB`` -> bytes; None if not a size."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * _UNITS[unit])
    except ValueError:
        return None


def _cli_bytes(text: str) -> int:
    value = parse_bytes(text)
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give bytes of at least 1, e.g. 67108864 "
                                         f"or 64M")
    return value


def _memory(value: Any, name: str) -> int | None:
    """None (the default share of free memory), bytes, or a size like '4G'."""
    if isinstance(value, str):
        size = parse_bytes(value)
        if size is None or size < 1:
            raise InvalidArgumentError(f"{name} must be bytes (an integer) or a size like "
                                       f"'512M' or '4G', not {value!r}")
        return size
    return optional_positive(value, name)


def cli_positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: give at least 1")
    return value


# -- the option objects ------------------------------------------------------------------
class Options:
    """Base of the option dataclasses: checks every field on construction; ``from_kwargs``
    routes flat keyword arguments into nested option objects."""

    #: nested option objects, field name -> class (their fields are flat in the API and CLI)
    NESTED: ClassVar[dict[str, type[Options]]] = {}

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name in self.NESTED:
                continue
            value = getattr(self, f.name)
            check, choices = f.metadata.get("check"), f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise InvalidArgumentError(f"{f.name} must be one of {sorted(choices)}, not "
                                           f"{value!r}")
            if check is not None:
                object.__setattr__(self, f.name, check(value, f.name))

    @classmethod
    def flat_fields(cls) -> list[dataclasses.Field]:
        """Every option, nested ones' included, in declaration order."""
        out = []
        for f in dataclasses.fields(cls):
            if f.name in cls.NESTED:
                out += cls.NESTED[f.name].flat_fields()
            else:
                out.append(f)
        return out

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in cls.flat_fields()}

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> Options:
        """Build from flat keyword arguments (the API's and the CLI's names)."""
        known = {f.name for f in cls.flat_fields()}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InvalidArgumentError(f"unknown option(s) {unknown}; the options are "
                                       f"{sorted(known)}")
        nested = {name: sub.from_kwargs(**{k: v for k, v in kwargs.items()
                                           if k in {f.name for f in sub.flat_fields()}})
                  for name, sub in cls.NESTED.items()}
        own = {k: v for k, v in kwargs.items()
               if k in {f.name for f in dataclasses.fields(cls)}}
        return cls(**own, **nested)

    def to_kwargs(self) -> dict[str, Any]:
        """The flat keyword arguments that build this object again."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out.update(value.to_kwargs() if f.name in self.NESTED else {f.name: value})
        return out

    def replace(self, **kwargs: Any) -> Options:
        return type(self).from_kwargs(**{**self.to_kwargs(), **kwargs})


@dataclass(frozen=True)
class CaptureOptions(Options):
    """How ``build_store`` captures: the options of :func:`engine.build_store` that shape the
    store's contents or the run, beside the model, the data and the layers."""

    sites: tuple[str, ...] = option(("output",), "the input and/or output side of each "
                                    "selected module", check=check_sites,
                                    cli={"nargs": "+", "choices": SITES})
    rows: str = option("items", "what a row of the store is: 'items' (one per dataset item) "
                       "or 'tokens' (one per labelled token of every sequence)",
                       choices=("items", "tokens"))
    select: Any = option(None, "which tensor of a layer's tuple, dict or ModelOutput to "
                         "probe (default: last_hidden_state, else the first floating-point "
                         "one): LAYER=INDEX or LAYER=KEY pairs", check=_select,
                         cli={"nargs": "+", "convert": _cli_select, "metavar": "LAYER=SEL"})
    reduce: Any = option("auto", "'none', 'pool', 'pool:HxW', 'subsample:K', 'tokens:mean' "
                         "(:max, :cls, :first, :last) or 'auto' (by max_features); per "
                         "layer: LAYER=SPEC pairs", check=_reduce,
                         cli={"nargs": "+", "convert": _cli_reduce, "metavar": "SPEC"})
    max_features: int = option(8192, "'auto' reduces a layer with more features than this",
                               check=positive)
    dtype: str = option("float16", "storage dtype of the features", choices=tuple(DTYPES))
    num_classes: int | None = option(None, "number of classes of y (default: the dataset's "
                                     "classes, else the largest label + 1)",
                                     check=optional_positive,
                                     cli={"flag": "--label-classes", "metavar": "N"})
    valid_size: Any = option("auto", "rows carved out of train for a 'valid' split when the "
                             "data has none: 'auto' (10,000 or 10%%), a count or a fraction",
                             check=_valid_size, cli={"type": _cli_valid_size})
    seed: int = option(0, "seed of the valid split and of subsample reductions",
                       check=integer)
    batch_size: int | None = option(None, "rows per forward pass (default: the "
                                    "DataLoader's, else 256)", check=optional_positive)
    device: str = option("auto", "'auto' (the model's, else CUDA when available), 'cpu', "
                         "'cuda:1', ...", check=_device)
    autocast: str | None = option(None, "run the forward under torch.autocast in this dtype",
                                  check=_one_of((None, "bfloat16", "float16"),
                                                "None, 'bfloat16' or 'float16'"),
                                  cli={"choices": ("bfloat16", "float16")})
    channels_last: bool = option(False, "run conv nets in channels-last memory format",
                                 check=flag)
    block_bytes: int = option(64 << 20, "host bytes of one block of rows, all layers (two "
                              "are in flight)", check=positive, cli={"type": _cli_bytes})
    compressor: str = option("lz4", "Blosc codec: lz4 (fast) or zstd (smaller)",
                             check=_one_of(tuple(COMPRESSORS), f"one of {sorted(COMPRESSORS)}"))
    nan_policy: str = option("raise", "on NaN / inf activations: raise (naming layer and row) "
                             "or ignore", check=_one_of(("raise", "ignore"),
                                                        "'raise' or 'ignore'"))

    def store_config(self, *, batch_size: int, block_rows: int,
                     labels: Sequence[str]) -> StoreConfig:
        """What the store records (a resume must repeat it), with the resolved batch size,
        the block size and the label sets."""
        return StoreConfig(dtype=self.dtype, batch_size=batch_size, seed=self.seed,
                           valid_size=self.valid_size, max_features=self.max_features,
                           autocast=self.autocast, channels_last=self.channels_last,
                           compressor=self.compressor, sites=self.sites,
                           block_rows=block_rows, labels=tuple(labels), rows=self.rows)


@dataclass(frozen=True)
class LBFGSOptions(Options):
    """Full-batch L-BFGS: solves each probe's penalised problem to ``max|grad| <= tol``."""

    max_iter: int = option(500, "L-BFGS: at most this many iterations per probe",
                           check=positive)
    tol: float = option(1e-4, "L-BFGS: stop a probe when max|grad| <= tol (scikit-learn's "
                        "lbfgs rule)", check=positive_float)


@dataclass(frozen=True)
class SGDOptions(Options):
    """Minibatch Adam streaming row blocks, with early stopping on the validation split."""

    epochs: int = option(30, "SGD: at most this many passes over train", check=positive)
    patience: int = option(5, "SGD: stop a probe after this many epochs without a lower "
                           "validation error", check=positive)
    lr: float = option(1e-2, "SGD: Adam's learning rate", check=positive_float)
    batch_size: int = option(256, "SGD: rows per minibatch", check=positive)
    seed: int = option(0, "seed of SGD's shuffled row order, of the control tasks and of "
                       "the MDL row order", check=integer)
    repeats: int = option(1, "SGD: fit every probe this many times, seeds seed, seed + 1, "
                          "...; the table gets each split's error mean and deviation over "
                          "the seeds", check=positive)
    early_stopping: bool = option(True, "SGD: stop each probe by its validation error (needs "
                                  "a 'valid' split) and keep its best weights", check=flag,
                                  cli={"help": "SGD: run every epoch, no early stopping"})


@dataclass(frozen=True)
class SolveOptions(Options):
    """The options of :func:`engine.solve` beside the source, the layers and the client."""

    NESTED: ClassVar[dict[str, type[Options]]] = {"lbfgs": LBFGSOptions, "sgd": SGDOptions}

    label: str = option("y", "which label set of the store to predict",
                        check=lambda v, n: check_name(v, "label"))
    solver: str = option("lbfgs", "lbfgs (exact optimum, full-batch passes), sgd "
                         "(streaming minibatches) or ridge (closed-form least squares on "
                         "{-1, +1} targets, one pass)",
                         check=_one_of(("lbfgs", "sgd", "ridge"), "'lbfgs', 'sgd' or 'ridge'"))
    l2: Any = option("auto", "lambda, several, or 'auto' (1e-6 ... 1e-1): the one with the "
                     "lowest validation error is kept", check=l2_grid,
                     cli={"nargs": "+", "convert": _cli_l2, "metavar": "L2"})
    device: str = option("auto", "'auto' (CUDA when available), 'cpu', 'cuda:1', ...",
                         check=_device)
    dtype: str = option("float32", "arithmetic: float32, tf32 (TF32 GEMMs on CUDA), float64, "
                        "or bfloat16 (SGD only)", choices=SOLVE_DTYPES)
    run: str = option("default", "name of the run under probes/ in the store (a rerun "
                      "finishes it)", check=_run_name)
    allow_partial: bool = option(False, "solve an incomplete store on its committed rows",
                                 check=flag)
    max_memory: int | None = option(
        None, "bytes of features one process keeps (resident features plus stream buffers); "
        "a layer that does not fit is streamed from the store every pass; default: half "
        "the device's free memory", check=_memory, cli={"type": _cli_bytes, "metavar": "BYTES"})
    shard: str = option("auto", "with a client: 'layers' (a task per layer), 'rows' (every "
                        "layer's rows split over the workers) or 'auto' (rows for layers "
                        "larger than max_memory)",
                        check=_one_of(("auto", "layers", "rows"), "'auto', 'layers' or 'rows'"))
    controls: tuple[str, ...] = option(
        (), "baseline probes fitted beside each layer's, at its chosen lambda: 'shuffled' "
        "(labels permuted) and/or 'control' (each item, or token type, a random class: "
        "Hewitt & Liang); selectivity = accuracy minus the first control's (default: none)",
        check=_controls, cli={"nargs": "+", "choices": CONTROLS})
    mdl: bool = option(False, "report each layer's online codelength and compression (MDL, "
                       "Voita & Titov) from probes fitted on growing shares of train",
                       check=flag)
    mdl_blocks: tuple[float, ...] = option(
        MDL_FRACTIONS, "the MDL block schedule in %% of train, increasing, ending at 100 "
        "(default: Voita & Titov's 0.1 0.2 0.4 ... 50 100)", check=_fractions,
        cli={"nargs": "+", "type": float, "metavar": "PERCENT"})
    shots: tuple[int, ...] = option(
        (), "few-shot probes beside each layer's: for each k, probes fitted on k train rows "
        "per class, each lambda of the grid, chosen on valid, over several random draws "
        "(CLIP's protocol) (default: none)", check=_shots,
        cli={"nargs": "+", "type": cli_positive, "metavar": "K"})
    draws: int = option(5, "few-shot draws per k (see shots)", check=positive)
    refit: bool = option(False, "after choosing lambda on valid, fit each probe again on "
                         "train + valid and score it on test (DINOv2's linear-eval protocol)",
                         check=flag)
    class_weight: str | None = option(None, "'balanced': train rows weighted N / (C N_c), "
                                      "scikit-learn's rule (valid / test are scored "
                                      "unweighted)", check=_one_of(
                                          (None, "balanced"), "None or 'balanced'"),
                                      cli={"choices": ("balanced",)})
    lbfgs: LBFGSOptions = field(default_factory=LBFGSOptions)
    sgd: SGDOptions = field(default_factory=SGDOptions)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shard == "rows" and self.solver == "ridge":
            raise InvalidArgumentError("row-parallel solves (shard='rows') run L-BFGS; ridge "
                                       "sums each layer's rows in one pass already: use "
                                       "shard='layers'")
        if self.shard == "rows" and self.solver != "lbfgs":
            raise InvalidArgumentError("row-parallel solves (shard='rows') run L-BFGS; SGD "
                                       "streams its rows already: use shard='layers'")
        if self.dtype == "bfloat16" and self.solver == "ridge":
            raise InvalidArgumentError(
                "dtype='bfloat16' is for solver='sgd': ridge sums its Gram matrix in float64 "
                "whatever the dtype; use dtype='float32' (or 'float64' for float64 weights)")
        if self.dtype == "bfloat16" and self.solver == "lbfgs":
            # bfloat16 gradients are too coarse for L-BFGS's line search near the optimum
            # (measured by benchmarks.precision: benchmarks/RESULTS.md, "Precision")
            raise InvalidArgumentError(
                "dtype='bfloat16' is for solver='sgd': L-BFGS with bfloat16 products stalls "
                "far from the optimum (gradient entries near 1e-3). Use dtype='tf32' for "
                "fast L-BFGS products on CUDA, or solver='sgd' with dtype='bfloat16'")
        if self.solver == "ridge" and self.tasks:
            raise InvalidArgumentError(f"{self.task_words()} are fitted beside each layer's "
                                       f"probe by L-BFGS (controls by SGD too), not by "
                                       f"ridge: use solver='lbfgs'")
        # SGD fits controls beside the grid's probes; the rest needs L-BFGS's exact optimum
        # at one lambda (MDL, refit) or its weights (class weights, few-shot draws)
        lbfgs_only = [w for w in self.asked_tasks() if w != "controls"]
        if self.solver == "sgd" and lbfgs_only:
            raise InvalidArgumentError(f"{' and '.join(lbfgs_only)} are fitted by L-BFGS, "
                                       f"beside each layer's probe: use solver='lbfgs' "
                                       f"(SGD fits controls alone)")

    @property
    def tasks(self) -> bool:
        """Whether probes other than the layer's own are asked for (controls, MDL, class
        weights)."""
        return bool(self.controls or self.mdl or self.class_weight or self.refit
                    or self.shots)

    def asked_tasks(self) -> list[str]:
        """The kinds of probe beside the layer's own that are asked for, in words."""
        return [w for w, on in (("controls", self.controls), ("MDL probes", self.mdl),
                                ("class weights", self.class_weight),
                                ("refits on train + valid", self.refit),
                                ("few-shot probes", self.shots)) if on]

    def task_words(self) -> str:
        return " and ".join(self.asked_tasks())

    @property
    def grid(self) -> tuple[float, ...]:
        return self.l2  # checked: sorted distinct lambdas

    def config(self, num_classes: int) -> dict:
        """What ``probes/<run>`` records: a rerun of the run must ask for the same."""
        out = {"solver": self.solver, "l2": list(self.grid), "label": self.label,
               "dtype": self.dtype, "num_classes": num_classes,
               "allow_partial": self.allow_partial}
        if self.solver == "lbfgs":
            out.update(max_iter=self.lbfgs.max_iter, tol=self.lbfgs.tol,
                       preconditioner=f"low-rank curvature, rank {RANK}")
        elif self.solver == "sgd":
            out.update(dataclasses.asdict(self.sgd))
            if self.sgd.repeats == 1:  # recorded when asked for: older runs resume as they were
                del out["repeats"]
        if self.controls:
            out.update(controls=list(self.controls))
        if self.mdl:
            out.update(mdl_blocks=list(self.mdl_blocks))
        if self.class_weight:
            out.update(class_weight=self.class_weight)
        if self.refit:
            out.update(refit=True)
        if self.shots:
            out.update(shots=list(self.shots), draws=self.draws)
        if self.controls or self.mdl or self.shots:
            out.update(seed=self.sgd.seed)
        return out


# -- the command line --------------------------------------------------------------------
def _flag(f: dataclasses.Field) -> str:
    return f.metadata["cli"].get("flag", "--" + f.name.replace("_", "-"))


def add_arguments(parser: argparse.ArgumentParser, cls: type[Options], *,
                  title: str | None = None) -> None:
    """One flag per option of ``cls``: ``--max-iter 500``; a bool that defaults to True
    becomes ``--no-<name>``, one that defaults to False ``--<name>``."""
    group = parser.add_argument_group(title) if title else parser
    for f in cls.flat_fields():
        cli = dict(f.metadata["cli"])
        name = _flag(f)
        cli.pop("flag", None)
        cli.pop("convert", None)
        help_ = cli.pop("help", f.metadata["help"])
        if isinstance(f.default, bool):
            if f.default:
                name = "--no-" + name.removeprefix("--")
            group.add_argument(name, dest=f.name, action="store_false" if f.default
                               else "store_true", help=help_)
            continue
        kind = cli.pop("type", None)
        if kind is None and f.metadata["check"] in (positive, optional_positive):
            kind = cli_positive
        elif kind is None and f.metadata["check"] is integer:
            kind = int
        elif kind is None and f.metadata["check"] is positive_float:
            kind = float
        choices = cli.pop("choices", f.metadata["choices"]
                          or getattr(f.metadata["check"], "allowed", None))
        if f.default is not None and "default" not in help_:
            shown = (" ".join(map(str, f.default)) if isinstance(f.default, tuple)
                     else f.default)
            help_ = f"{help_} (default: {shown})"
        group.add_argument(name, dest=f.name, type=kind, choices=choices, default=None,
                           help=help_, **cli)


def from_args(cls: type[Options], args: argparse.Namespace,
              parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The options given on the command line, as keyword arguments (what was not given is
    left to the API's defaults); a value argparse could not check alone is a usage error."""
    out = {}
    for f in cls.flat_fields():
        value = getattr(args, f.name, None)
        if value is None or (isinstance(f.default, bool) and value == f.default):
            continue
        convert = f.metadata["cli"].get("convert")
        if convert is not None:
            try:
                value = convert(value)
            except ValueError as exc:
                parser.error(f"argument {_flag(f)}: {exc}")
        elif f.metadata["cli"].get("nargs"):
            value = tuple(value)
        out[f.name] = value
    return out
