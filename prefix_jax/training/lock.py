"""One live run per workdir: `acquire(workdir)` takes `workdir/run.lock`, `release()` drops it.

A local workdir is locked with `flock` on run.lock, which the kernel drops when the holder
exits in any way (kill -9 included), so a lock can never be left held by a dead run. The file
holds the holder's pid, host and start time: a second run is refused with them at once; a run
that finds the file written but not locked knows its holder died without releasing it, and
takes it over with a warning. A clean exit deletes the file.

flock works on local disks and on NFS (Linux emulates it with byte-range locks there); on
file systems that ignore it (some FUSE mounts, e.g. gcsfuse) it does not exclude anything.
A `gs://` (or other remote) workdir has no lock primitive through a file API: there the lock
is the file alone. A run refuses a lock file whose holder may be alive; the holder is known to
be dead only on the same host (its pid is gone, or the host has rebooted since); a lock left by
a dead run on another host must be deleted by hand (the error says which file). Two runs that
start within the same moment on a remote workdir can both pass (no atomic create-if-absent).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys

from absl import logging

from prefix_jax.errors import UserError

LOCK_NAME = "run.lock"


def _boot_id() -> str:
    """Changes at every boot of this host (a pid from before a reboot names no live run)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _holder_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since "
            f"{holder.get('started')}")


def _parse(text: str) -> dict | None:
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _warn(message: str) -> None:
    logging.warning(message)
    print(f"warning: {message}", file=sys.stderr)


class Lock:
    """A held workdir lock; `release()` is idempotent."""

    def release(self) -> None:
        raise NotImplementedError


class _NoLock(Lock):
    def release(self) -> None:
        pass


NO_LOCK = _NoLock()  # what processes other than process 0 hold


class _LocalLock(Lock):
    def __init__(self, path: str, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still locked: an opener that got it re-checks the inode
        os.close(self.fd)  # drops the flock
        self.fd = -1


def _acquire_local(workdir: str) -> Lock:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_NAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            with open(path) as f:
                holder = _parse(f.read())
            who = _describe(holder) if holder else "another run that is starting"
            raise UserError(f"--workdir={workdir} is in use by a running training run ({who}; "
                            f"lock {path}); wait for it to end, stop it, or use another "
                            "--workdir") from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # the holder released (and deleted) the file between our open and lock
    previous = _parse(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
    if previous:
        _warn(f"took over the lock {path} of a run that ended without releasing it "
              f"({_describe(previous)}; killed?)")
    record = json.dumps(_holder_record()).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    return _LocalLock(path, fd)


def _holder_is_dead(holder: dict) -> bool:
    """True only when the holder certainly is not running: on this host, and rebooted since
    or its pid gone."""
    if holder.get("host") != socket.gethostname():
        return False
    if holder.get("boot_id") and holder.get("boot_id") != _boot_id():
        return True
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


class _RemoteLock(Lock):
    def __init__(self, path):
        self.path = path

    def release(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def _acquire_remote(workdir: str) -> Lock:
    from etils import epath  # a dependency of orbax

    directory = epath.Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    if path.exists():
        holder = _parse(path.read_text()) or {}
        if not _holder_is_dead(holder):
            raise UserError(f"--workdir={workdir} is locked by {_describe(holder)} (lock "
                            f"{path}); if that run is no longer running, delete {path} and "
                            "rerun; otherwise wait or use another --workdir")
        _warn(f"took over the lock {path} of a run that is no longer running "
              f"({_describe(holder)})")
    path.write_text(json.dumps(_holder_record()))
    return _RemoteLock(path)


def acquire(workdir: str) -> Lock:
    """Lock `workdir` for this process (creating the directory) or raise a UserError naming
    the live holder."""
    if "://" in workdir:
        return _acquire_remote(workdir)
    return _acquire_local(os.path.abspath(workdir))
