"""How every command line ends on bad input: one line naming the flag, file or field and what was expected.

Code that checks a user's input raises ``UserError`` (or a subclass: ``ConfigError``, ``CheckpointError``, the
sampler's ``JobError``, ...). Each command's entry point is wrapped by ``guarded``, which prints such an error as
``error: <message>`` on stderr and exits with ``EXIT_USER_ERROR``, without a traceback or the help text; any other
exception is a bug or a failure of the machine and keeps its traceback. Flag-parsing errors are one line too:
absl's (``FATAL Flags parsing error: ...``) and ``ArgumentParser``'s (a ``UserError``).

Stdlib only: the modules whose errors subclass ``UserError`` import it without pulling in anything.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any

EXIT_USER_ERROR = 2  # as argparse and absl exit on a bad command line


class UserError(Exception):
    """A problem with the user's input (flag, file, config field), found before anything was written."""


def guarded(main: Callable[..., Any]) -> Callable[..., Any]:
    """``main`` printing a ``UserError`` as one line and exiting non-zero instead of raising it."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return run


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors are ``UserError``s: one line, no usage block before it."""

    def error(self, message: str):
        raise UserError(f"{message} (--help lists the flags)")
