"""A run directory's life: one live run per directory, partial files cleaned, earlier runs kept.

`RunLock(run_dir)` guards `out/<run_name>/` while a run uses it. The lock is the file
`out/.<run_name>.lock` beside the directory (not inside it, so it stays put when a fresh run moves
an earlier run's directory aside), held with `fcntl.flock` and holding the owner's PID, host
and start time as JSON:

- a second run of the same name finds the flock taken and stops with `RunLockedError`, whose
  one-line message names the PID and host of the live run, before anything is written or moved;
- the kernel drops a flock when its process dies (also `kill -9`), so a lock file left by a
  crashed run is *stale*: the next run takes it over and says whose it was.

flock is advisory and per host: on a network file system without working locks two hosts could
both take it. A lock file naming another host that is still held is reported as such.

`clean_partial_files(run_dir)` removes the `.<name>.<random>.tmp` files that
`altgrad.tracking.atomic_path` leaves when a write is killed; call it only while holding the lock.
`move_aside(run_dir)` renames an earlier run's directory to `<run_dir>.<date-time>`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import time
from pathlib import Path

__all__ = ["RunLock", "RunLockedError", "lock_path", "lock_holder", "process_alive", "clean_partial_files",
           "move_aside"]

_PARTIAL = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")  # tracking.temp_path's names: .<name>.<random>.tmp


class RunLockedError(RuntimeError):
    """Another live process holds the run directory's lock (one-line message)."""


def lock_path(run_dir: str | os.PathLike) -> Path:
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}.lock"


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        holder = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    since = holder.get("started")
    when = f" since {since}" if since else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{when}"


def process_alive(pid) -> bool:
    """Whether a process with this PID exists on this host."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def lock_holder(run_dir: str | os.PathLike) -> dict | None:
    """{pid, host, started} of the live run holding `run_dir`'s lock, or None when it is free
    (no lock file, or a stale one). Takes no lock and creates nothing."""
    path = lock_path(run_dir)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return _read_holder(fd) or {"pid": None, "host": None}
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """Exclusive use of a run directory by this process (see the module docstring).

    acquire() returns the stale holder it took over ({} when the lock was free), or raises
    RunLockedError; release() (also at process exit, by the kernel) frees it.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = lock_path(self.run_dir)
        self._fd: int | None = None

    def acquire(self) -> dict:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise RunLockedError(
                        f"{self.run_dir} is in use by a live run ({_describe(holder)}; lock {self.path}); "
                        "wait for it, stop it, or use another log.run_name") from None
                raise
            # the file we locked must still be the one at self.path (a releasing run unlinks it)
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _read_holder(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(me) + "\n").encode())
        self._fd = fd
        return stale

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: a waiting opener then sees another inode
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def clean_partial_files(run_dir: str | os.PathLike) -> list[Path]:
    """Remove partial temp files of killed atomic writes in `run_dir`; returns what was removed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    removed = []
    for p in sorted(run_dir.iterdir()):
        if p.is_file() and _PARTIAL.match(p.name):
            p.unlink()
            removed.append(p)
    return removed


def move_aside(run_dir: str | os.PathLike) -> Path:
    """Rename `run_dir` to `<run_dir>.<YYYYmmdd-HHMMSS>` (a suffix -2, -3, ... when taken)."""
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kept, n = run_dir.with_name(f"{run_dir.name}.{stamp}"), 1
    while kept.exists():
        n += 1
        kept = run_dir.with_name(f"{run_dir.name}.{stamp}-{n}")
    run_dir.rename(kept)
    return kept
