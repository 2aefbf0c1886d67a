"""Files: checksums and fsync (shared by prepared data and checkpoints), output checks, write failures."""
from __future__ import annotations

import errno
import hashlib
import os
import re
import tempfile
from pathlib import Path

from hvdbert.errors import UsageError


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (which makes the names in it, a rename included, durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def nearest_existing(path: Path) -> Path:
    """`path` itself when it exists, else its closest existing ancestor."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_output_location(path: Path, flag: str = "--output") -> None:
    """Refuse, before anything is computed or written, an output directory that cannot be made:
    an existing file, a file among its parents, or a location that cannot be written (a read-only
    mount, /proc). Writability is probed by creating and removing an empty directory where the
    output would go: os.access() answers yes to root on a read-only mount and on /proc."""
    path = Path(path)
    where = nearest_existing(path)
    if not where.is_dir():
        what = "is a file" if where == Path(os.path.abspath(path)) else f"is inside {where}, a file"
        raise UsageError(f"{flag} {path} {what}, not a directory; choose a directory")
    try:
        probe = tempfile.mkdtemp(prefix=".hvdbert-write-probe-", dir=where)
        os.rmdir(probe)
    except OSError as error:
        raise UsageError(f"{flag} {path}: cannot write in {where} ({error.strerror}); choose a location "
                         "you can write") from None


def check_output_file(path: Path, flag: str = "--json") -> None:
    """Refuse, before any work, a file to write that cannot be written: an existing directory (found
    only at the end otherwise, after the work), or a place check_output_location refuses."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; name a file, e.g. {flag} {path / 'results.json'}")
    check_output_location(path.parent, flag)


def write_failure(error: BaseException, directory: Path) -> OSError | None:
    """The OSError behind a failed write where the library that wrote hid it: safetensors reports
    `os error N` in its own exception type, and torch.save's zip writer only an "unexpected pos"
    RuntimeError on a full disk. None when nothing says it was the filesystem."""
    if isinstance(error, OSError):
        return None  # already says what it is
    found = re.search(r"os error (\d+)", str(error))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code), str(directory))
    if isinstance(error, Exception):
        try:
            usage = os.statvfs(directory)
        except OSError:
            return None
        if usage.f_bavail * usage.f_frsize < 1 << 20:  # less than 1 MiB left: the write filled the disk
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return None
