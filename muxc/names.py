"""Names that become paths: one check for task names, one for every path muxc writes.

A task name is a directory name in ``save_adapters`` output, so a tenant's name must never
reach outside the directory it is written under:

>>> check_name("sst2")
'sst2'
>>> check_name("..")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
muxc.errors.TaskSpecError: task name '..' is a relative path component; ...
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from muxc.errors import TaskSpecError, UnsafePathError

__all__ = ["MAX_NAME_BYTES", "check_name", "safe_child"]

# A file name is at most 255 bytes on common file systems (ext4, xfs, btrfs, APFS); 128 leaves
# room for suffixes a caller adds (``pass_NN_<name>.txt``) and for encrypted file systems.
MAX_NAME_BYTES = 128
_SEPARATORS = ("/", "\\")
_CONTROL = {"Cc", "Cs", "Zl", "Zp"}  # C0/C1 controls (NUL, tab, newline), surrogates, line breaks


def check_name(name: object, what: str = "task name") -> str:
    """Return ``name`` if it is safe as one path component, else raise `TaskSpecError`.

    Refused: non-str, empty or whitespace-only, leading/trailing whitespace, ``.`` and ``..``,
    ``/`` or ``\\``, NUL and other control characters, more than `MAX_NAME_BYTES` UTF-8 bytes.
    """
    if not isinstance(name, str) or not name:
        raise TaskSpecError(f"{what} must be a non-empty string, got {name!r}")
    if not name.strip():
        raise TaskSpecError(f"{what} {name!r} is only whitespace; use letters, digits, '-', '_'")
    if name != name.strip():
        raise TaskSpecError(
            f"{what} {name!r} has leading or trailing whitespace; use {name.strip()!r}"
        )
    if name in (".", ".."):
        raise TaskSpecError(
            f"{what} {name!r} is a relative path component; it names a directory and would "
            "write outside its own folder; use letters, digits, '-', '_'"
        )
    sep = next((s for s in _SEPARATORS if s in name), None)
    if sep is not None:
        raise TaskSpecError(
            f"{what} {name!r} contains the path separator {sep!r}; it becomes a directory name, "
            f"so use e.g. {name.replace('/', '_').replace(chr(92), '_')!r}"
        )
    bad = next((c for c in name if unicodedata.category(c) in _CONTROL), None)
    if bad is not None:
        raise TaskSpecError(
            f"{what} {name!r} contains the control character U+{ord(bad):04X} at index "
            f"{name.index(bad)}; use printable characters only"
        )
    size = len(name.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise TaskSpecError(
            f"{what} {name[:24]!r}... is {size} bytes in UTF-8; names become file names and may "
            f"be at most {MAX_NAME_BYTES} bytes; use a shorter name"
        )
    return name


def safe_child(root: str | Path, name: str) -> Path:
    """``Path(root) / name`` after checking that it resolves to a path strictly under ``root``.

    Raises `UnsafePathError` when ``name`` (or a symlink already at ``root / name``) leads
    elsewhere, so a write through the returned path stays inside ``root``. The path is returned
    as the caller spelled ``root`` (relative stays relative).

    >>> safe_child("out", "a").as_posix()
    'out/a'
    """
    top = Path(root).resolve()
    child = (top / name).resolve()
    if child == top or not child.is_relative_to(top):
        raise UnsafePathError(
            f"refusing to write {name!r} under {str(root)!r}: it resolves to {str(child)!r}, "
            f"which is not inside {str(top)!r}; use a plain file name (and no symlink there)"
        )
    return Path(root) / name
