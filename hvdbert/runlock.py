"""One writer per run directory: an advisory lock that rank 0 holds for the whole run.

Two runs on one `--output` (a SLURM job requeued while the first is still shutting down, a
command started twice) would both append to metrics.jsonl and prune each other's checkpoints.
Rank 0 takes an exclusive `flock` on RUN_DIR/lock before it reads or writes anything there and
keeps it until the process exits (the kernel releases it then, also after `kill -9`, so a
leftover file never blocks anyone). The file records who holds it, for the refusal message.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from hvdbert.errors import UsageError

log = logging.getLogger("hvdbert")

LOCK_FILE = "lock"


class RunLock:
    """An open, locked RUN_DIR/lock (or, where the filesystem has no locks, an unlocked stand-in)."""

    def __init__(self, path: Path, fd: int | None, created: tuple[Path, ...] = ()):
        self.path = path
        self._fd = fd
        self.created = created  # what taking the lock made: the lock file and directories, innermost first

    @property
    def exclusive(self) -> bool:
        """Whether the flock is held (False for the unlocked stand-in on a filesystem without locks)."""
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def abandon(self) -> None:
        """Release, and remove what taking the lock created (while still holding it): a run refused
        after locking (a checkpoint that does not fit) leaves its --output as it found it."""
        for path in self.created:
            try:
                path.rmdir() if path.is_dir() else path.unlink()
            except OSError:
                break  # something else was put there meanwhile: it stays, and so do its parents
        self.release()


def holder_of(path: Path) -> str:
    try:
        return " ".join(path.read_text(encoding="utf-8").split()) or "a process that has not said who it is"
    except OSError:
        return "an unknown process"


def in_use(run_dir: Path, path: Path, waited: float = 0.0) -> UsageError:
    after = f" after waiting {waited:g} s (elastic.lock_wait_seconds)" if waited > 0 else ""
    return UsageError(f"{run_dir} is in use by another run ({holder_of(path)}){after}; one run writes to a run "
                      "directory at a time: wait for it to end, stop it, or choose another --output")


def lock_run_dir(run_dir: Path, wait_seconds: float = 0.0) -> RunLock:
    """Create RUN_DIR if needed and lock it, or refuse (UsageError) naming the run that holds it.
    wait_seconds: how long to wait for a holder that is expected to go away (an elastic job's
    previous rank 0, on a host that left the job)."""
    run_dir = Path(run_dir)
    created = [path for path in (run_dir, *run_dir.parents) if not os.path.lexists(path)]
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    if not os.path.lexists(path):
        created.insert(0, path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    started = time.monotonic()
    waited_for = None  # the holder this call waits for, once it has had to wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as error:
            busy = error.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
            if busy and time.monotonic() < started + wait_seconds:
                if waited_for is None:
                    waited_for = holder_of(path)
                    log.warning("hvdbert: %s is held by %s; waiting up to %g s (elastic.lock_wait_seconds) for "
                                "that process to end", path, waited_for, wait_seconds)
                time.sleep(0.2)
                continue
            os.close(fd)
            if busy:
                raise in_use(run_dir, path, waited=wait_seconds) from None
            # Some network filesystems (Lustre mounted without -o flock) have no locks at all.
            log.warning("hvdbert: cannot lock %s (%s): make sure no other run uses this directory",
                        path, error.strerror)
            return RunLock(path, None, tuple(created))
    if waited_for is not None:
        log.warning("hvdbert: %s released after %.1f s of waiting", path, time.monotonic() - started)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode())
    return RunLock(path, fd, tuple(created))


def check_free(run_dir: Path) -> None:
    """Refuse (UsageError) when a run holds RUN_DIR's lock now; writes nothing (a pre-flight check:
    the run itself takes the lock with lock_run_dir)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file (a new run directory) or none readable: nothing to ask
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise in_use(run_dir, path) from None
    finally:
        os.close(fd)


class RankZeroLock:
    """RUN_DIR/lock as rank 0 holds it, whichever process rank 0 is: after an elastic reset it can be
    another one (the previous rank 0's host left the job), which then takes the lock over."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._held: RunLock | None = None

    @property
    def held(self) -> bool:
        return self._held is not None

    @property
    def exclusive(self) -> bool:
        """Held with a real flock: no other process, on any host, writes in the run directory."""
        return self._held is not None and self._held.exclusive

    def take(self, wait_seconds: float = 0.0) -> None:
        if self._held is None:
            self._held = lock_run_dir(self.run_dir, wait_seconds)

    def release(self) -> None:
        if self._held is not None:
            self._held.release()
            self._held = None

    def abandon(self) -> None:
        """Release, leaving the run directory as it was before take() (RunLock.abandon)."""
        if self._held is not None:
            self._held.abandon()
            self._held = None
