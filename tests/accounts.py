"""Real permission denials in tests, also as root (whom file permissions let through): a folder that every account
can enter, and a block run with the effective user id of `nobody`."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

NOBODY = 65534


@contextlib.contextmanager
def open_folder() -> Iterator[Path]:
    """A temporary folder every account can enter (pytest's tmp_path is its owner's alone)."""
    path = Path(tempfile.mkdtemp())
    path.chmod(0o755)
    try:
        yield path
    finally:
        for folder in path.rglob("*"):  # the private ones, so that they can be removed
            if folder.is_dir() and not folder.is_symlink():
                folder.chmod(0o755)
        shutil.rmtree(path)


def private(folder: Path) -> Path:
    """Make `folder` unreadable to the unprivileged block."""
    folder.chmod(0)
    return folder


@contextlib.contextmanager
def unprivileged() -> Iterator[None]:
    """As root, run the block as `nobody` (root again after it); as another account, as that account."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
