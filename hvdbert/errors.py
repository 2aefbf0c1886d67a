"""Bad input is reported as one line on stderr with exit status 2, never as a traceback."""
from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
from typing import Any, Callable


# Failures of the machine rather than of hvdbert: reported in one line, like bad input, since the user
# fixes them the same way (free space, another location). Other OSErrors keep their traceback.
ENVIRONMENT_ERRORS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EROFS: "choose a location you can write",
    errno.EACCES: "choose a location you can use",
    errno.EPERM: "choose a location you can use",
    errno.EIO: "check the disk",
    errno.EFBIG: "check the file size limit (ulimit -f)",
    errno.ENAMETOOLONG: "choose a shorter path",
}


# 128 + SIGINT: the status a shell reports for a program a Ctrl-C stopped.
INTERRUPTED = 130


def _say_interrupted(prog: str) -> None:
    print(f"{prog}: interrupted (SIGINT)", file=sys.stderr, flush=True)


def quiet_interrupts(prog: str) -> None:
    """For a command run as a program, called before its imports (torch and transformers take
    seconds): a Ctrl-C among them ends in one line and exit status 130, as `cli_entry` ends one inside
    main() (in hvd.init, say), instead of a KeyboardInterrupt traceback from deep inside an import."""
    previous = sys.excepthook

    def hook(kind, value, traceback) -> None:
        if not issubclass(kind, KeyboardInterrupt):
            return previous(kind, value, traceback)
        _say_interrupted(prog)
        sys.stdout.flush()
        os._exit(INTERRUPTED)  # Python would otherwise end the process by SIGINT itself

    sys.excepthook = hook


class UsageError(Exception):
    """Bad input from the user: a recipe, a flag, a data directory, a worker count, a checkpoint.

    The message names what is wrong and what would be valid; it is printed as one line.
    """


def cli_entry(prog: str) -> Callable[[Callable[..., int | None]], Callable[..., int]]:
    """Wrap a command's main(): UsageError becomes `prog: error: ...` on stderr and exit status 2."""

    def decorate(main: Callable[..., int | None]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapper(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs) or 0
            except UsageError as error:
                message = " ".join(str(error).split())  # one line, whatever the message holds
                print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
                return 2
            except KeyboardInterrupt:  # Ctrl-C where nothing handles it: in hvd.init, or a second one in training
                _say_interrupted(prog)
                return INTERRUPTED
            except OSError as error:
                if error.errno not in ENVIRONMENT_ERRORS:
                    raise
                where = f"{error.filename}: " if error.filename else ""
                print(f"{prog}: error: {where}{error.strerror}; {ENVIRONMENT_ERRORS[error.errno]}",
                      file=sys.stderr, flush=True)
                return 2

        return wrapper

    return decorate


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a UsageError (one line, exit 2) instead of usage text."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise UsageError(f"{message} (see {self.prog} --help)")


def rank_zero_decides(rank: int, broadcast: Callable[[Any], Any], action: Callable[[], Any]) -> Any:
    """Run `action` on rank 0 and give every rank its result; if it refuses (UsageError), every rank
    stops alike: rank 0 raises the error (reported as one line), the others exit 2 quietly, and none
    is left waiting in a collective. `broadcast(value)` sends rank 0's value to every rank (Horovod's
    broadcast_object, mpi4py's bcast)."""
    outcome: tuple[str, Any] = ("ok", None)
    error = None
    if rank == 0:
        try:
            outcome = ("ok", action())
        except UsageError as refusal:
            error, outcome = refusal, ("refused", None)
    status, result = broadcast(outcome)
    if error is not None:
        raise error
    if status == "refused":
        raise SystemExit(2)
    return result
