"""Core records of the dataset layer: one labelled image (:class:`Datum`) and a dataset's splits.

Readers return :class:`DatasetSplits` holding plain lists of :class:`Datum`; samplers, manifests and the
``ImageListDataset`` work on those lists, so a new reader is one function and nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Datum:
    """One labelled image, as Dassl's ``Datum`` (without its unused ``domain``).

    Frozen, so lists of data compare and hash by value (tests compare sampled subsets directly).

    Attributes:
        impath: Absolute path of the image file.
        label: Class index into :attr:`DatasetSplits.classnames`.
        classname: Human-readable class name (as the dataset's reader produced it).
    """

    impath: str
    label: int
    classname: str


@dataclass
class DatasetSplits:
    """The train / val / test splits of one dataset and its class names.

    Attributes:
        name: Registry name of the dataset (e.g. ``"caltech101"``).
        train: Training data.
        val: Validation data (may be empty: then a caller must not select on test in its place).
        test: Test data; few-shot sampling never touches it.
        classnames: ``classnames[label]`` is the name of class ``label``.
        root: The dataset's own directory (e.g. ``$DATA/caltech-101``). Manifests store image paths relative to it,
            so a manifest hash does not depend on where the data is mounted. ``None`` when unknown.
    """

    name: str
    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    classnames: list[str]
    root: Optional[str] = field(default=None)

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classnames)``)."""
        return len(self.classnames)

    def __repr__(self) -> str:  # the default repr would print every Datum
        return (f"DatasetSplits(name={self.name!r}, train={len(self.train)}, val={len(self.val)}, "
                f"test={len(self.test)}, classes={len(self.classnames)}, root={self.root!r})")
