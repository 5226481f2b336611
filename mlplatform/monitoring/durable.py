"""Files written whole or not at all, and still there after a crash or a power cut.

Every file the platform's monitoring writes (traffic profiles and their sidecars, the training
reference profile, a replica's traffic counters) goes through this module: the bytes go to a
temporary file in the target's own directory, are flushed and ``fsync``ed, and only then take
the target's name (``os.replace``, or a hard link when the name must not be taken twice), after
which the directory is ``fsync``ed so that the new name itself survives a power cut. A reader
therefore sees the old file, the complete new one, or no file; never a truncated one. Nothing
here imports Dagster or Ray.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def write_atomically(path: Path, data: bytes) -> Path:
    """Replace ``path`` with ``data`` in one step, durably (its directory is created if needed).

    Args:
        path: the file to write; an existing file is replaced.
        data: its complete contents.

    Returns:
        ``path``.

    Raises:
        OSError: if the file cannot be written (the previous file, if any, is then untouched).

    """
    path = Path(path)
    with _durable_temporary(path.parent, path.name, data) as temporary:
        os.replace(temporary, path)
    _sync_directory(path.parent)
    return path


def write_new(directory: Path, stem: str, suffix: str, data: bytes) -> Path:
    """Write ``data`` durably under the first free name ``<stem><suffix>``, ``<stem>-1<suffix>``...

    A name is claimed with a hard link, which fails if the name exists: two writers (a replica
    and its restarted self) can never overwrite each other's file.

    Args:
        directory: where the file goes (created if needed).
        stem: the name before the counter, e.g. a window's stamp and replica id.
        suffix: the extension, with its dot.
        data: the file's complete contents.

    Returns:
        The path written.

    Raises:
        OSError: if the file cannot be written.

    """
    directory = Path(directory)
    with _durable_temporary(directory, stem, data) as temporary:
        target = _claim_free_name(temporary, directory, stem, suffix)
    _sync_directory(directory)
    return target


@contextlib.contextmanager
def _durable_temporary(directory: Path, name: str, data: bytes) -> Iterator[Path]:
    """A temporary file in ``directory`` holding ``data``, on disk; removed afterwards if left.

    Its name starts with a dot and ``name``, so readers of the directory skip it and retention
    (which goes by the name's leading window stamp) can tell its age.
    """
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f".{name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(temporary, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        yield temporary
    finally:
        temporary.unlink(missing_ok=True)


def _claim_free_name(source: Path, directory: Path, stem: str, suffix: str) -> Path:
    for n in itertools.count():
        target = directory / (f"{stem}{suffix}" if n == 0 else f"{stem}-{n}{suffix}")
        try:
            os.link(source, target)
            return target
        except FileExistsError:
            continue
        except OSError:
            # No hard links on this file system: check then rename (racy only between two
            # writers with the same stem in the same second).
            if target.exists():
                continue
            os.replace(source, target)
            return target
    raise AssertionError("unreachable")


def _sync_directory(directory: Path) -> None:
    """Make the directory's entries (a new or renamed name) durable."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
