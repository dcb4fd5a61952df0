"""What a person reads on the console: progress bars, a few result lines and warnings; library chatter goes to a
log file.

Libraries log much at INFO (orbax about 45 lines per checkpoint save, clu every scalar of every step, TF, jax),
which buried the few lines that matter. ``route_logs`` (called by each command) sends every log record to a log
file and only warnings of this project and errors of any library to the console; ``-v/--verbosity`` (absl's own
flag in the absl commands, the same flag in the others), or absl's ``--alsologtostderr``, prints everything at
that level on the console as well. Records logged before the command knows where its log file goes (the trainer
opens it in the workdir once the inputs passed their checks, so that a refused run writes nothing) wait in
memory until ``write_log_to``.

Importing this module sets ``TF_CPP_MIN_LOG_LEVEL=1`` (unless set): TF's C++ INFO lines are printed before any
Python handler exists. TF's oneDNN notice ignores it (written from C++ while TF loads): ``import_quietly`` loads
such a module with the process's stderr sent to the log file.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from absl import flags
from absl import logging as absl_logging
from absl.logging import converter
from tqdm import tqdm

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

OUR_FOLDERS = tuple(str(p) + os.sep for p in (Path(__file__).parent, Path(__file__).parent.parent / "convert"))
MAX_PENDING = 20_000  # records kept in memory before the log file opens (the oldest are dropped first)


def _ours(record: logging.LogRecord) -> bool:
    """Logged by this project's code (a captured ``warnings.warn`` counts by the file it names)."""
    where = record.getMessage() if record.name == "py.warnings" else record.pathname
    return any(folder in where for folder in OUR_FOLDERS)


class _ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or (record.levelno >= logging.WARNING and _ours(record))


class _ShortFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


class _LogFile(logging.Handler):
    """Every record, kept in memory until ``open`` names the file, then appended to it."""

    def __init__(self):
        super().__init__()
        self.setFormatter(absl_logging.PythonFormatter())
        self.pending: collections.deque[logging.LogRecord] = collections.deque(maxlen=MAX_PENDING)
        self.file: logging.FileHandler | None = None

    def open(self, path: Path) -> None:
        self.file = logging.FileHandler(path, encoding="utf-8")
        self.file.setFormatter(self.formatter)
        while self.pending:
            self.file.handle(self.pending.popleft())

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is None:
            self.pending.append(record)
        else:
            self.file.handle(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()


_log_file: _LogFile | None = None
_stderr_of_imports: list[str] = []  # what ``import_quietly`` caught, logged once ``route_logs`` is set up


def import_quietly(module: str) -> None:
    """Import ``module`` with file descriptor 2 (stderr, also of C++) caught and logged instead; on an import
    error what it wrote is printed after all."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            importlib.import_module(module)
        except BaseException:
            os.dup2(saved, 2)
            caught.seek(0)
            sys.stderr.write(caught.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        caught.seek(0)
        text = caught.read().decode(errors="replace").strip()
    if text:
        _stderr_of_imports.append(f"import {module} wrote to stderr:\n{text}")


def route_logs(verbosity: int | None = None, *, to_file: bool = True) -> None:
    """Log records to the log file (``write_log_to``; none without ``to_file``) at INFO, or ``verbosity`` (absl
    levels: -1 WARNING, 0 INFO, 1 DEBUG); on the console only this project's warnings and any errors, unless
    ``verbosity`` is given."""
    global _log_file
    root = logging.getLogger()
    for handler in list(root.handlers):  # absl's, an earlier call's, or a stderr one of logging.basicConfig
        if handler is absl_logging.get_absl_handler() or isinstance(handler, _LogFile) or (
                type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.__stderr__)):
            root.removeHandler(handler)
    root.setLevel(converter.absl_to_standard(verbosity if verbosity is not None else 0 if to_file else -1))
    logging.captureWarnings(True)
    console = logging.StreamHandler(sys.stderr)
    if verbosity is None:
        console.addFilter(_ConsoleFilter())
        console.setFormatter(_ShortFormatter())
    else:
        console.setFormatter(absl_logging.PythonFormatter())
    root.addHandler(console)
    _log_file = _LogFile() if to_file else None
    if _log_file is not None:
        root.addHandler(_log_file)
    for text in _stderr_of_imports:
        logging.info("%s", text)
    _stderr_of_imports.clear()


def write_log_to(path: str | os.PathLike) -> Path | None:
    """Append the log (what was logged so far, then everything) to ``path``; None when ``route_logs`` was not
    called (tdd_jax used as a library: its caller's logging is left alone)."""
    if _log_file is None:
        return None
    path = Path(path)
    _log_file.open(path)
    return path


def absl_verbosity() -> int | None:
    """The absl command's ``-v/--verbosity`` when given (or ``--alsologtostderr``/``--logtostderr``), else None."""
    f = flags.FLAGS
    if f["verbosity"].present or f["alsologtostderr"].value or f["logtostderr"].value:
        return f.verbosity
    return None


def add_verbosity_flag(parser: argparse.ArgumentParser) -> None:
    """``-v/--verbosity`` for an argparse command, as absl's: print the library logs at that level too."""
    parser.add_argument("-v", "--verbosity", type=int, default=None,
                        help="also print the library logs on the console at this level (0: INFO, 1: DEBUG)")


def say(message: str) -> None:
    """One line for the person at the console (stdout), placed above any progress bar."""
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


def progress(total: int, desc: str, unit: str, *, initial: int = 0, disable: bool = False) -> tqdm:
    """A progress bar with rate and ETA on stderr; when stderr is not a terminal (a file, a pod's collected
    output) it is redrawn every 30 s at most instead of 10 times a second."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)


@contextlib.contextmanager
def timed(what: str, disable: bool = False):
    """Print ``what...`` now and ``done in N s`` (plus anything the block put in the yielded list) after it."""
    notes: list[str] = []
    if not disable:
        print(f"{what}...", end=" ", flush=True)
    start = time.perf_counter()
    yield notes
    if not disable:
        print(f"done in {time.perf_counter() - start:.1f} s" + (f" ({'; '.join(notes)})" if notes else ""),
              flush=True)
