"""Atomic outputs: a file or folder appears complete under its final name, or not at all.

Everything is written under a temporary name in the destination's own folder (same filesystem, so the final
``os.replace`` is a rename) and removed again if writing fails. What appears is readable as the umask allows
(0644 under the usual 022), also where a writer replaced the temporary file with its own private one
(safetensors' ``save_file`` writes a 0600 temporary file and renames it over the path it is given).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tdd_jax.cli import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class OutputExists(UserError, FileExistsError):
    """The output is there already and ``overwrite`` was not asked for."""


def _allow_reading(path: Path) -> None:
    """Add the read (and, for folders, search) bits the umask allows to ``path`` and everything under it."""
    allowed = ~_umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        bits = (0o555 if p.is_dir() else 0o444) & allowed
        os.chmod(p, p.stat().st_mode | bits)


@contextlib.contextmanager
def atomic_file(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExists(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _allow_reading(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; on success it takes the place of ``path``.

    An existing ``path`` (with ``overwrite``) is moved aside first and deleted only after the new folder is in
    place, so a failure at any point leaves the old one intact.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExists(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        yield tmp
        _allow_reading(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / path.name, path)
                raise
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
