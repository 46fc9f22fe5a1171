"""One writer per store: an exclusive lock held by ``build_store`` for the whole build.

The lock is a file beside the store, ``<parent>/.<name>.lock``, so that it exists before
the store does and survives ``overwrite=True`` removing the store. It holds the holder's
pid, host and start time as JSON, for the error message of a second writer.

- Where the filesystem supports it (local disks, NFS with lockd), the lock is
  ``fcntl.flock`` on that file: the kernel drops it when the holder dies, however it dies
  (SIGKILL included), so a dead process never blocks a later build.
- Elsewhere (``flock`` fails with ENOLCK / EOPNOTSUPP / ...), the file itself is the lock,
  created with ``O_CREAT | O_EXCL``. A lock file whose pid is not alive on this host, or
  whose holder has not refreshed it for :data:`STALE_SECONDS` (a thread touches it every
  :data:`HEARTBEAT_SECONDS`), is stale and taken over.
- fsspec URLs other than ``file://`` get no lock (object stores have no portable lock):
  best effort, one writer per store is then the caller's job.

The lock file is removed when the build ends; a killed build leaves it behind, harmless.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import StoreError, StoreLockedError

#: how often a holder refreshes an O_EXCL lock file, and when one is stale
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0

#: flock errors that mean "this filesystem cannot lock", not "someone holds it"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def lock_path(path: str | os.PathLike) -> Path | None:
    """Where the lock of the store at ``path`` lives; None for remote URLs (no lock)."""
    text = str(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        return None
    p = Path(os.path.realpath(os.path.abspath(text)))
    return p.parent / f".{p.name}.lock"


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _read(lock: Path) -> dict:
    try:
        info = json.loads(lock.read_text())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _locked_error(store: str, lock: Path, info: dict, how: str) -> StoreLockedError:
    who = (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} "
           f"(since {info.get('since', '?')})") if info else "another process"
    return StoreLockedError(
        f"the store at {store} is being written by {who}: one writer at a time. Wait for "
        f"that build to finish (or stop it; {how}), then rerun with resume=True. Lock file: "
        f"{lock}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


@contextmanager
def hold(path: str | os.PathLike):
    """Hold the store at ``path`` for writing, or raise :class:`StoreLockedError`."""
    lock = lock_path(path)
    if lock is None:
        yield None
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create {lock.parent} for the store at {path}: {exc}; "
                         f"choose a writable path") from exc
    fd = _flock(str(path), lock)
    if fd is not None:
        try:
            yield lock
        finally:
            try:
                lock.unlink(missing_ok=True)  # still locked: nobody can be between
            finally:
                os.close(fd)
        return
    _exclusive(str(path), lock)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, stop), daemon=True,
                            name="probe-engine-lock")
    beat.start()
    try:
        yield lock
    finally:
        stop.set()
        beat.join()
        if _read(lock).get("pid") == os.getpid():
            lock.unlink(missing_ok=True)


def _flock(store: str, lock: Path) -> int | None:
    """An fd holding an flock on ``lock``; None when the filesystem cannot flock."""
    import fcntl

    for _ in range(100):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot create the lock file {lock} of the store at {store}: "
                             f"{exc}; choose a writable path") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read(lock)
            os.close(fd)
            raise _locked_error(store, lock, info, "the lock goes when its process ends") \
                from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_FLOCK:
                return None
            raise
        # the previous holder may have unlinked the file between our open and our flock
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(_holder()).encode())
            return fd
        os.close(fd)
    raise StoreLockedError(f"could not take the lock {lock} of the store at {store}: it "
                           f"keeps changing hands")


def _exclusive(store: str, lock: Path) -> None:
    """O_CREAT | O_EXCL lock file, taking over a stale one."""
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            info = _read(lock)
            if not _stale(lock, info):
                raise _locked_error(store, lock, info, "if that process is gone, delete the "
                                                       "lock file") from None
            lock.unlink(missing_ok=True)  # a dead holder's: take it over
            continue
        except OSError as exc:
            raise StoreError(f"cannot create the lock file {lock} of the store at {store}: "
                             f"{exc}; choose a writable path") from exc
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(_holder()))
        return
    raise StoreLockedError(f"could not take the lock {lock} of the store at {store}: it "
                           f"keeps changing hands")


def _stale(lock: Path, info: dict) -> bool:
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return True
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        return not _alive(info["pid"])
    return age > STALE_SECONDS


def _heartbeat(lock: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            os.utime(lock)
        except OSError:
            return
