"""Dataset registry: readers register by decorator under open string keys (like timm's model registry).

A reader is ``fn(root: str, **kwargs) -> DatasetSplits``; ``root`` is the folder that holds the dataset's standard
directory (CoOp's ``$DATA``), except where a reader documents otherwise (``imagefolder`` takes the dataset itself).
"""

from __future__ import annotations

from typing import Callable

from .base import DatasetSplits

Reader = Callable[..., DatasetSplits]

_DATASETS: dict[str, Reader] = {}


def register_dataset(name: str) -> Callable[[Reader], Reader]:
    """Register a dataset reader under ``name``.

    Args:
        name: Registry key, e.g. ``"caltech101"``. Third parties may register their own.

    Returns:
        A decorator that registers ``fn(root, **kwargs) -> DatasetSplits`` and returns it unchanged.

    Raises:
        ValueError: If ``name`` is already registered to a different function.
    """

    def deco(fn: Reader) -> Reader:
        old = _DATASETS.get(name)
        # Re-registering the same function (module reloaded) is harmless; a different one would silently
        # change which data a config reads.
        if old is not None and getattr(old, "__qualname__", None) != getattr(fn, "__qualname__", None):
            raise ValueError(f"dataset {name!r} is already registered (to {old.__module__}.{old.__qualname__})")
        _DATASETS[name] = fn
        return fn

    return deco


def list_datasets() -> list[str]:
    """Return the sorted names of all registered datasets."""
    return sorted(_DATASETS)


def build_dataset(name: str, root: str, **kwargs) -> DatasetSplits:
    """Read a registered dataset.

    Args:
        name: A name from :func:`list_datasets`.
        root: The folder holding the dataset's standard directory (see each reader).
        **kwargs: Reader-specific options (e.g. ``task=`` and ``split=`` for ``vtab1k``).

    Returns:
        The dataset's splits.

    Raises:
        ValueError: For an unknown name (the message lists the registered names), a wrong root (the message names
            the expected path), a missing split file, or malformed split data.
    """
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; registered datasets: {', '.join(list_datasets())}")
    return _DATASETS[name](str(root), **kwargs)
