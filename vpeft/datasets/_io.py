"""Private helpers shared by the readers: path checks with readable errors, listing, class-name tables."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any, Optional

from .base import Datum

# torchvision's IMG_EXTENSIONS, kept here so listing does not import torchvision.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def abs_root(root: str) -> str:
    return os.path.abspath(os.path.expanduser(str(root)))


def dataset_dir(root: str, folder: str, name: str, hint: str = "") -> str:
    """``root/folder`` as an absolute path, or a ValueError naming the path that was expected."""
    root = abs_root(root)
    path = os.path.normpath(os.path.join(root, folder))
    if os.path.isdir(path):
        return path
    msg = f"{name}: expected the dataset directory {path}, which does not exist"
    if folder not in (".", "") and os.path.basename(root) == folder:
        # The most common mistake: passing the dataset folder itself instead of its parent.
        msg += f" (root {root} looks like the dataset folder itself: pass its parent {os.path.dirname(root)})"
    else:
        msg += f" (root must be the folder that holds '{folder}/'"
        msg += f"; {hint})" if hint else ")"
    raise ValueError(msg)


def require_dir(path: str, name: str, what: str = "directory", hint: str = "") -> str:
    if not os.path.isdir(path):
        extra = f" ({hint})" if hint else ""
        raise ValueError(f"{name}: expected the {what} {path}{extra}, which does not exist")
    return path


def require_file(path: str, name: str, what: str = "split file") -> str:
    if not os.path.isfile(path):
        raise ValueError(f"{name}: missing {what} {path}")
    return path


def read_json(path: str, name: str, what: str = "split file") -> Any:
    require_file(path, name, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name}: {what} {path} is not valid JSON ({err})") from None


def read_lines(path: str, name: str, what: str = "split file") -> list[tuple[int, str]]:
    """Non-empty stripped lines of a text file with their 1-based line numbers."""
    require_file(path, name, what)
    with open(path, encoding="utf-8") as f:
        return [(i, line.strip()) for i, line in enumerate(f, 1) if line.strip()]


def list_subdirs(path: str) -> list[str]:
    """Sorted names of the non-hidden sub-directories of ``path``."""
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def list_files(path: str, extensions: Optional[Sequence[str]] = None) -> list[str]:
    """Sorted names of the non-hidden files of ``path``, optionally only those with an image extension.

    Sorted, unlike Dassl's ``listdir_nohidden``, whose ``os.listdir`` order differs between file systems.
    """
    names = (e.name for e in os.scandir(path) if e.is_file() and not e.name.startswith("."))
    if extensions is not None:
        names = (n for n in names if n.lower().endswith(tuple(extensions)))
    return sorted(names)


def check_exist(name: str, *splits: Iterable[Datum]) -> None:
    """Fail early, naming the files, when a split references images that are not on disk."""
    missing = [d.impath for items in splits for d in items if not os.path.isfile(d.impath)]
    if missing:
        shown = "\n  ".join(missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{name}: {len(missing)} image file(s) named by the split are missing, e.g.:\n  {shown}{more}")


def classnames_from(name: str, *splits: Iterable[Datum]) -> list[str]:
    """``classnames[label]`` from the data itself; labels must be ``0..n-1`` with one name each."""
    table: dict[int, str] = {}
    for items in splits:
        for d in items:
            old = table.setdefault(d.label, d.classname)
            if old != d.classname:
                raise ValueError(f"{name}: label {d.label} has two class names, {old!r} and {d.classname!r}")
    if not table:
        raise ValueError(f"{name}: the dataset is empty")
    n = max(table) + 1
    gaps = [y for y in range(n) if y not in table]
    if gaps or min(table) < 0:
        raise ValueError(f"{name}: labels must be 0..{n - 1} with no gaps; missing {gaps[:10]}")
    return [table[y] for y in range(n)]
