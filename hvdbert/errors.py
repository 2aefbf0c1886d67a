"""Bad input is reported as one line on stderr with exit status 2, never as a traceback."""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable


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

        return wrapper

    return decorate


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a UsageError (one line, exit 2) instead of usage text."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise UsageError(f"{message} (see {self.prog} --help)")
