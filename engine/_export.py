"""Export of probe results to files other tools read without probe-engine: every layer's
probe weights as safetensors or NumPy ``.npz``, and the results tables as Parquet.

Weights: tensors ``<layer>/W`` (D, C) float32 and ``<layer>/b`` (C,) float32, plus the run's
description as JSON (``{run, path, config, layers, l2}``): the safetensors header's string
metadata under ``"probe_engine"``, or the ``.npz`` entry ``__metadata__`` (a 0-d unicode
array, so that ``np.load(path, allow_pickle=False)`` reads it; every tensor name holds a
``/``, so no layer's can be it). Tables: ``ProbeResults.table`` or ``.grid`` with pyarrow,
the run's description in the file's key-value metadata under ``probe_engine``, beside
pandas' own.

Every file is written to a temporary name in its folder and moved into place with
``os.replace``, so an error (or a kill) never leaves a partial file under the name asked for,
and an existing file is replaced whole or not at all.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import secrets
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np

from . import format as fmt
from .errors import DataError, InvalidArgumentError, MissingDependencyError

# ``results`` below is an engine.ProbeResults, left unannotated: results.py imports this
# module, and tests/test_layout.py counts type-checking imports as imports too

__all__ = ["FORMATS", "load_weights", "save_weights", "to_parquet", "weights_format"]

#: file suffix -> weights format
FORMATS = {".safetensors": "safetensors", ".npz": "npz"}
#: the key of the run's description in a safetensors header or a Parquet file's metadata
META_KEY = "probe_engine"
#: the ``.npz`` entry that holds it
NPZ_META = "__metadata__"
_ZIP_MAGIC = b"PK\x03\x04"  # an .npz is a zip file; a safetensors file starts with its size


def weights_format(path: str | os.PathLike, format: str | None = None) -> str:
    """``format`` checked, or the one ``path``'s suffix names; :class:`InvalidArgumentError`
    naming the path and the suffixes otherwise."""
    if format is not None:
        if format not in FORMATS.values():
            raise InvalidArgumentError(f"format={format!r} for {path}: use one of "
                                       f"{sorted(FORMATS.values())}")
        return format
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InvalidArgumentError(
            f"{path}: cannot tell the weights format from the suffix {suffix or '(none)'!r}; "
            f"name the file *.safetensors or *.npz, or pass format='safetensors' or 'npz'")
    return FORMATS[suffix]


def save_weights(results, path: str | os.PathLike,
                 format: str | None = None) -> None:
    """Write every layer's probe (W (D, C), b (C,) float32) to ``path``."""
    path = Path(path)
    kind = weights_format(path, format)
    tensors = {}
    for layer, (w, b) in results.weights.items():
        # float32 and C-contiguous: what the store holds, bit for bit (safetensors and .npy
        # both write the raw buffer)
        tensors[f"{layer}/W"] = np.ascontiguousarray(w, dtype=np.float32)
        tensors[f"{layer}/b"] = np.ascontiguousarray(b, dtype=np.float32)
    meta = _describe(results, layers=list(results.weights),
                     l2=dict(zip(results.table.layer, results.table.l2, strict=True)))
    if kind == "safetensors":
        st = _require("safetensors.numpy", "safetensors")
        data = st.save(tensors, metadata={META_KEY: meta})  # metadata: str -> str only
        with _replacing(path) as tmp, open(tmp, "wb") as f:
            # bytes written here, not save_file(): that creates its file with mode 0600
            f.write(data)
    else:
        with _replacing(path) as tmp, open(tmp, "wb") as f:
            # a file object, not a name: np.savez appends ".npz" to a name without it
            np.savez(f, **tensors, **{NPZ_META: np.array(meta)})


def load_weights(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """layer -> (W (D, C), b (C,)) from a file :func:`save_weights` wrote, either format
    (told apart by content, not suffix), in the layer order it was written in."""
    path = Path(path)
    with open(path, "rb") as f:
        npz = f.read(4) == _ZIP_MAGIC
    if npz:
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, zipfile.BadZipFile) as exc:  # object arrays (pickles) are
            # refused, never loaded
            raise DataError(f"{path}: {exc}; a probe weights .npz holds plain numeric arrays "
                            f"only (ProbeResults.save_weights writes one)") from exc
        entry = arrays.pop(NPZ_META, None)
        meta = None if entry is None else str(entry.item())
    else:
        safetensors = _require("safetensors", "safetensors")
        try:
            with safetensors.safe_open(path, framework="np") as f:
                meta = (f.metadata() or {}).get(META_KEY)
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        except safetensors.SafetensorError as exc:
            raise DataError(f"{path} is neither a safetensors nor an .npz file ({exc}); "
                            f"write one with ProbeResults.save_weights") from exc
    return _by_layer(path, arrays, json.loads(meta).get("layers") if meta else None)


def to_parquet(results, path: str | os.PathLike, *, grid: bool = False) -> None:
    """Write ``results.table`` (``grid=True``: ``results.grid``) to ``path`` as Parquet, the
    run's description in the file's metadata."""
    pa = _require("pyarrow", "pyarrow")
    pq = _require("pyarrow.parquet", "pyarrow")
    path = Path(path)
    table = pa.Table.from_pandas(results.grid if grid else results.table)
    # merged, not replaced: pandas' own entry ("pandas") restores dtypes and the index
    meta = {**(table.schema.metadata or {}),
            META_KEY.encode(): _describe(results, table="grid" if grid else "table").encode()}
    with _replacing(path) as tmp:
        pq.write_table(table.replace_schema_metadata(meta), tmp)


def _describe(results, **extra) -> str:
    """The run as JSON: its name, store, solver config, and ``extra``."""
    return json.dumps(fmt.json_safe({
        "run": results.run, "path": None if results.path is None else str(results.path),
        "config": results.config, **extra}), default=str)  # default: a value JSON lacks


def _by_layer(path: Path, arrays: dict[str, np.ndarray],
              order: list[str] | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Tensors named ``<layer>/W`` and ``<layer>/b`` as layer -> (W, b), checked."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in arrays.items():
        layer, sep, part = name.rpartition("/")  # the last '/': a layer name may hold one
        if not sep or part not in ("W", "b"):
            raise DataError(f"{path}: tensor {name!r} is not named '<layer>/W' or "
                            f"'<layer>/b'; this is not a file ProbeResults.save_weights wrote")
        parts.setdefault(layer, {})[part] = arr
    out = {}
    for layer in [*(order or []), *(k for k in parts if k not in (order or []))]:
        p = parts.get(layer, {})
        w, b = p.get("W"), p.get("b")
        if w is None or b is None or w.ndim != 2 or b.shape != (w.shape[1],):
            shapes = {k: v.shape for k, v in p.items()}
            raise DataError(f"{path}: layer {layer!r} needs W (D, C) and b (C,), and has "
                            f"{shapes or 'neither'}; the file is incomplete or not written "
                            f"by ProbeResults.save_weights")
        out[layer] = (w, b)
    return out


def _require(module: str, package: str) -> ModuleType:
    """``module``, or an error saying how to install the optional ``package``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{package} is not installed, and this file format needs it (an optional "
            f"dependency of probe-engine): pip install {package} (or pip install "
            f"'probe-engine[export]')",
            name=package) from exc


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[str]:
    """A temporary name beside ``path`` to write to; moved onto ``path`` when the block
    succeeds, removed when it fails (so no partial file is left under either name)."""
    folder = path.parent
    if not folder.is_dir():
        raise InvalidArgumentError(f"{path}: the folder {folder} does not exist; create it "
                                   f"or choose another path")
    # created with open(mode "x"), not mkstemp: mkstemp's mode 0600 would stay on the file,
    # where an export should get the umask's permissions as any new file does (so the
    # writers below write into this file, never create their own)
    tmp = str(folder / f".{path.name}.{secrets.token_hex(4)}.tmp")
    open(tmp, "xb").close()
    try:
        yield tmp
        os.replace(tmp, path)  # atomic within one file system: hence the same folder
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
