"""What probe-engine needs of zarr-python beyond its public API, in one place.

zarr-python's stores are asynchronous and some facts a crash-safe writer relies on (how
``LocalStore`` writes a key aside and renames it) are not part of its API, so they may move
between minor releases. pyproject.toml pins the minor version this module was written
against (:data:`TESTED`); ``tests/test_zarr_compat.py`` checks every assumption below
against the installed zarr, so that a new minor version fails there first, by name.

Nothing else in probe-engine imports from ``zarr.core``, ``zarr.storage._*`` or calls a
private zarr name; fault-injection tests and benchmarks reach zarr's write path through
:data:`LOCAL_PUT`, :data:`BLOSC_ENCODE` and :func:`write_aside`.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import zarr
import zarr.errors
import zarr.storage
import zarr.storage._local as _local
from zarr.abc.store import Store as ZarrStore
from zarr.codecs import BloscCodec
from zarr.core.sync import sync as _sync

__all__ = ["TESTED", "GroupNotFoundError", "ZarrStore", "sync", "open_zarr_store", "exists",
           "exists_many", "list_prefix", "delete_all", "TEMP_FILE", "temp_files",
           "remove_temp_files", "LOCAL_PUT", "BLOSC_ENCODE", "write_aside", "temp_path",
           "buffer_bytes",
           "version"]

#: the zarr-python minor version these assumptions were checked against
TESTED = (3, 1)

GroupNotFoundError = zarr.errors.GroupNotFoundError

T = TypeVar("T")


def sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run one of a zarr store's coroutines on zarr's own event loop thread."""
    return _sync(coroutine)


def open_zarr_store(path: str | os.PathLike, *, read_only: bool) -> ZarrStore:
    """A ``LocalStore`` for a local path, else an ``FsspecStore`` for the URL."""
    if "://" not in str(path):
        return zarr.storage.LocalStore(Path(path), read_only=read_only)
    # a local file:// URL goes through fsspec too (as on a shared mount); its folders are
    # not created by the writes themselves
    options = {"auto_mkdir": True} if str(path).startswith("file://") else None
    return zarr.storage.FsspecStore.from_url(str(path), read_only=read_only,
                                             storage_options=options)


def exists(store: ZarrStore, key: str) -> bool:
    return sync(store.exists(key))


def exists_many(store: ZarrStore, keys: Sequence[str]) -> list[bool]:
    """Whether each key exists, asked concurrently: one round trip on object stores."""
    async def ask() -> list[bool]:
        return list(await asyncio.gather(*(store.exists(k) for k in keys)))

    return sync(ask()) if keys else []


def list_prefix(store: ZarrStore, prefix: str) -> list[str]:
    async def collect() -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    return sync(collect())


def delete_all(store: ZarrStore) -> None:
    """Delete every key of ``store``."""
    sync(store.delete_dir(""))


# -- LocalStore's write path -------------------------------------------------------------
#: ``LocalStore`` writes every key to ``<name>.<32 hex>.partial`` and renames it over
#: ``<name>``; a process killed in between leaves such a file behind, never a torn key
TEMP_FILE = re.compile(r"\.[0-9a-f]{32}\.partial$")

#: (module, name) of the function ``LocalStore`` writes every key with, ``(path, value,
#: exclusive) -> int``: what fault-injection tests wrap (``monkeypatch.setattr(*LOCAL_PUT, f)``)
LOCAL_PUT = (_local, "_put")
#: (class, name) of Blosc's per-chunk encoder, ``async (self, chunk, spec)``
BLOSC_ENCODE = (BloscCodec, "_encode_single")
#: ``write_aside(path, mode, exclusive)``: the context manager ``LocalStore`` writes a key
#: through (a temporary file, renamed over ``path`` when the block exits cleanly)
write_aside = _local._atomic_write


def temp_path(path: Path) -> Path:
    """A name ``LocalStore`` could write the key at ``path`` aside to (:data:`TEMP_FILE`)."""
    return path.with_suffix(f".{uuid.uuid4().hex}.partial")


def buffer_bytes(value: Any) -> bytes:
    """The bytes of a zarr ``Buffer`` (what :data:`LOCAL_PUT` is handed)."""
    return bytes(value.as_buffer_like())


def temp_files(path: str | os.PathLike) -> list[Path]:
    """Temporary files that killed writers left in the local store at ``path``."""
    if "://" in str(path) or not Path(path).is_dir():
        return []
    return [Path(d) / f for d, _, files in os.walk(path) for f in files if TEMP_FILE.search(f)]


def remove_temp_files(path: str | os.PathLike) -> int:
    """Delete what :func:`temp_files` finds, and the folders a killed writer created and left
    empty (zarr warns about them); only a writer holding the store's lock may. Returns the
    number of files and folders removed."""
    if "://" in str(path) or not Path(path).is_dir():
        return 0
    removed = 0
    for d, _, names in os.walk(path, topdown=False):
        for f in names:
            if TEMP_FILE.search(f):
                Path(d, f).unlink(missing_ok=True)
                removed += 1
        if os.path.normpath(d) != os.path.normpath(path) and not os.listdir(d):
            os.rmdir(d)
            removed += 1
    return removed


def version() -> tuple[int, int]:
    """(major, minor) of the installed zarr-python."""
    major, minor = zarr.__version__.split(".")[:2]
    return int(major), int(minor)
