"""Replace a directory atomically: write a sibling temp dir, fsync it, swap it in.

`atomic_directory(path)` yields an empty sibling ``.<name>.muxc-tmp-<random>``. When the
body finishes, every file and directory in it is fsynced and it takes ``path``'s place:
on Linux by one ``renameat2(RENAME_EXCHANGE)`` (the old directory is at ``path`` until the very
instant the new one is), elsewhere by two renames (old aside to ``.<name>.muxc-old-<random>``,
new into place), a window in which `previous` finds the old one. The parent directory is
fsynced, then the old directory is removed. If the body raises, the temp dir is removed and
``path`` is untouched; a process killed mid-write leaves only a stale temp dir, removed by the
next save to the same path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory", "fsync_tree", "sha256", "previous"]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temp directory that replaces ``path`` (all or nothing) when the body returns."""
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{path.name}.muxc-tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.muxc-tmp-", dir=parent))
    try:
        yield tmp
        fsync_tree(tmp)
        _swap_in(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def previous(path: Path) -> Path | None:
    """The old directory a save left aside when it stopped between its two renames (not on
    Linux, which swaps in one step), or None."""
    path = Path(path)
    found = sorted(path.parent.glob(f".{path.name}.muxc-old-*"))
    return found[-1] if found else None


def _swap_in(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.rename(tmp, path)
        _fsync_dir(path.parent)
        return
    if _exchange(tmp, path):  # tmp now holds the old directory
        _fsync_dir(path.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.muxc-old-", dir=path.parent))
    os.rmdir(old)
    os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux ``renameat2``); False where it is unavailable."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    ok = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0
    return ok  # e.g. EINVAL on a file system without RENAME_EXCHANGE: fall back to two renames


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (and ``root``)."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. directories cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
