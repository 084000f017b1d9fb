"""Writing an adapter directory so that a failure never leaves a half-written one in its place.

The files go into a new directory beside the target, are flushed to disk, and the new directory
takes the target's place with renames; entries of an existing target that the save does not
write are carried over (hard links where possible). A save that fails at any point leaves an
existing target as it was and removes its staging directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path


def save_directory_atomically(
    save_directory: str | os.PathLike,
    write: Callable[[Path], None],
    written: Iterable[str],
) -> None:
    """Call ``write(staging)`` to fill a new directory, then put it in ``save_directory``'s place.

    Args:
        save_directory: the directory to create or replace.
        write: writes the files named in ``written`` into the directory it is given.
        written: the names ``write`` creates; other entries of an existing ``save_directory``
            are carried over into the new one.

    Raises:
        ValueError: if ``save_directory`` exists and is not a directory.
    """
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"save_directory {target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    written = tuple(written)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        write(staging)
        for name in written:
            _fsync(staging / name)
        if target.is_dir():
            _carry_over(target, staging, written)
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _carry_over(old: Path, staging: Path, written: tuple[str, ...]) -> None:
    """Bring the entries of ``old`` that the save does not write into ``staging``."""
    for entry in old.iterdir():
        if entry.name in written:
            continue
        destination = staging / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry), destination)
        elif entry.is_dir():
            shutil.copytree(entry, destination, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(destination))


def _swap_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` is kept until that succeeds."""
    if not target.exists():
        os.rename(staging, target)
        return
    backup = target.parent / f".{target.name}.replaced-{uuid.uuid4().hex}"
    os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)
