"""File names and paths that come from data (ids in a dataset file, names in a listing) made safe.

A dataset field never becomes a path as it is: an id becomes a file name only through
:func:`safe_file_name` (kept when it is a plain name, else mapped to a digest), and a relative
path read from data is joined to its root only through :func:`path_inside`, which refuses
absolute paths and any ``..`` that would leave the root.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path, PurePosixPath

#: ids kept as file names as they are: a letter or digit, then letters, digits, ``._-``
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,150}")


class UnsafePathError(ValueError):
    """A path read from data would point outside the folder it belongs in."""


def safe_file_name(identifier: str) -> str:
    """``identifier`` itself when it is a plain name (:data:`PLAIN_NAME`, no ``..``), else
    ``_`` and its sha256 (plain names never start with ``_``, so the two never collide)."""
    text = str(identifier)
    if PLAIN_NAME.fullmatch(text) and ".." not in text:
        return text
    return "_" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def path_inside(root: str | os.PathLike, relative: str, what: str = "path") -> Path:
    """``root / relative`` for a relative path read from data; UnsafePathError when it is
    absolute, empty, or leaves ``root`` (``..``, or a symlink inside ``root`` pointing out)."""
    text = str(relative)
    parts = PurePosixPath(text.replace("\\", "/")).parts
    if not text or PurePosixPath(text).is_absolute() or os.path.isabs(text) or ".." in parts:
        raise UnsafePathError(f"{what} {text!r} is not a relative path inside {root}; "
                              "the data file that lists it is wrong or hostile")
    target = Path(root) / text
    base = Path(root).resolve()
    if not target.resolve().is_relative_to(base):
        raise UnsafePathError(f"{what} {text!r} leads outside {root} (through a link)")
    return target
