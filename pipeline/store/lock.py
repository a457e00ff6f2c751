"""One writer per pool (and per release folder): an advisory lock held for a whole command.

The lock is ``filelock``'s ``fcntl.flock`` on ``<folder>/.clipcurate.lock``: the kernel drops it when
its process dies, however it dies (SIGKILL included), so a lock left by a dead process is simply
taken by the next writer; nothing has to guess whether a pid is alive. Beside it,
``.clipcurate.lock.json`` says who holds it (pid, host, command, since) for the refusal message;
the next holder overwrites it. flock is local to one machine's kernel: pools on NFS need
``local_lock`` semantics or one writing machine (README, "One writer per pool").

Within one process the lock is re-entrant (a flow that holds it calls stages that take it again).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import LockedError, UserError
from pipeline.store.parquet import write_json_atomic

LOCK_NAME = ".clipcurate.lock"

_held: dict[str, int] = {}  # resolved lock path -> how deep this process holds it
_guard = threading.Lock()


def holder(folder: Path, name: str = LOCK_NAME) -> dict[str, Any] | None:
    """Who last took the lock ``name`` in ``folder`` (None if nobody did)."""
    try:
        return json.loads((folder / f"{name}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.get("since", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} (`{info.get('command')}`, since {since})"


@contextmanager
def writer_lock(folder: str | Path, command: str | None = None, wait: bool = False,
                name: str = LOCK_NAME) -> Iterator[None]:  # fmt: skip
    """Hold the writer lock ``folder/name`` (the folder is created if missing) for the block; an
    export locks ``.<out>.lock`` beside its release folder.

    Raises:
        LockedError: another process holds it and ``wait`` is false; names the holder.
        UserError: the folder cannot be written (a read-only pool, say).
    """
    import filelock

    folder = Path(folder)
    key = str(folder.resolve() / name)
    info_path = folder / f"{name}.json"
    with _guard:
        if key in _held:
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _guard:
                _held[key] -= 1
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(folder / name), timeout=-1 if wait else 0, thread_local=False)
        lock.acquire()
    except filelock.Timeout:
        who = _describe(holder(folder, name))
        raise LockedError(f"{folder / name}: held by {who}; wait for it to finish, or pass --wait") from None
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            why = exc.strerror
            raise UserError(f"{folder}: cannot be written ({why}); writing commands need a writable folder") from None
        raise
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}  # fmt: skip
        write_json_atomic(info_path, info)
        with _guard:
            _held[key] = 1
        try:
            yield
        finally:
            with _guard:
                del _held[key]
            info_path.unlink(missing_ok=True)
    finally:
        lock.release()
