"""Image loading (:class:`ImageListDataset`) and the generic ``imagefolder`` reader."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Callable, Optional

import torch.utils.data
from PIL import Image

from ._io import IMG_EXTENSIONS, abs_root, list_files, list_subdirs, require_dir
from .base import DatasetSplits, Datum
from .registry import register_dataset

logger = logging.getLogger(__name__)


def _load_rgb(path: str) -> Image.Image:
    with Image.open(path) as img:  # the context manager closes the file handle once decoded
        return img.convert("RGB")


def _is_readable(path: str) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError, ...)
        return False


class ImageListDataset(torch.utils.data.Dataset):
    """A map-style dataset over a list of :class:`Datum`: ``(transform(RGB PIL image), label)``.

    Args:
        items: The images to serve, in order.
        transform: Applied to the RGB PIL image; ``None`` returns the PIL image.
        skip_corrupt: Check every image up front (``PIL.Image.verify``), drop those that fail and log a warning with
            their count. Otherwise a corrupt or unreadable image raises ``ValueError`` naming the file when it is
            loaded.

    Raises:
        ValueError: With ``skip_corrupt=True``, when no image at all is readable.
    """

    def __init__(self, items: Sequence[Datum], transform: Optional[Callable] = None, skip_corrupt: bool = False):
        self.items = list(items)
        self.transform = transform
        self.skipped: list[str] = []
        if skip_corrupt:
            keep = [d for d in self.items if _is_readable(d.impath)]
            if len(keep) < len(self.items):
                kept = {id(d) for d in keep}
                self.skipped = [d.impath for d in self.items if id(d) not in kept]
                if not keep:
                    raise ValueError(f"none of the {len(self.items)} images could be read, e.g. {self.skipped[0]}")
                logger.warning("skipped %d of %d corrupt or unreadable images (first: %s)",
                               len(self.skipped), len(self.items), self.skipped[0])
            self.items = keep

    def __len__(self) -> int:
        return len(self.items)

    @property
    def targets(self) -> list[int]:
        """Labels in order (torchvision's name), e.g. for class-balanced samplers."""
        return [d.label for d in self.items]

    def __getitem__(self, index: int):
        d = self.items[index]
        try:
            img = _load_rgb(d.impath)
        except Exception as err:  # re-raised with the file name: PIL's own message often lacks it
            raise ValueError(f"cannot read image {d.impath}: {type(err).__name__}: {err}") from err
        if self.transform is not None:
            img = self.transform(img)
        return img, d.label


def _read_class_folders(split_dir: str, class_to_idx: dict[str, int], name: str) -> list[Datum]:
    items = []
    for cls in list_subdirs(split_dir):
        if cls not in class_to_idx:
            raise ValueError(f"{name}: class folder {os.path.join(split_dir, cls)} has no counterpart in train/")
        cdir = os.path.join(split_dir, cls)
        items.extend(Datum(os.path.join(cdir, f), class_to_idx[cls], cls) for f in list_files(cdir, IMG_EXTENSIONS))
    return items


@register_dataset("imagefolder")
def imagefolder(root: str) -> DatasetSplits:
    """A generic ``root/{train,val,test}/<class>/<image>`` tree.

    Classes are the sorted folder names of ``train/`` (label = position); ``val/`` is optional (empty when
    absent) and ``val/``, ``test/`` may only use those classes. Files with a common image extension are read
    (``.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp``, any case); other files are ignored.

    Args:
        root: The dataset folder itself (the one holding ``train/``).

    Raises:
        ValueError: If ``train/`` or ``test/`` is missing, ``train/`` has no class folders, or a class folder of
            ``val/`` / ``test/`` is unknown to ``train/``.
    """
    root = abs_root(root)
    name = "imagefolder"
    train_dir = require_dir(os.path.join(root, "train"), name, "training folder",
                            "root must be the dataset folder holding train/<class>/<image>")
    test_dir = require_dir(os.path.join(root, "test"), name, "test folder")
    classes = list_subdirs(train_dir)
    if not classes:
        raise ValueError(f"{name}: {train_dir} has no class folders")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    train = _read_class_folders(train_dir, class_to_idx, name)
    val_dir = os.path.join(root, "val")
    val = _read_class_folders(val_dir, class_to_idx, name) if os.path.isdir(val_dir) else []
    test = _read_class_folders(test_dir, class_to_idx, name)
    if not train:
        raise ValueError(f"{name}: no images found under {train_dir}")
    return DatasetSplits(name, train, val, test, classes, root=root)
