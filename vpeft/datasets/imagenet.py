"""ImageNet in CoOp's layout and the test-only ImageNet-V2 / -Sketch / -A / -R sets (CoOp's DATASETS.md).

``root`` is the folder holding every dataset directory::

    $DATA/imagenet/images/{train,val}/<wnid>/*.JPEG     + classnames.txt ("<wnid> <class name>" a line)
    $DATA/imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg   + classnames.txt
    $DATA/imagenet-sketch/images/<wnid>/*               + classnames.txt
    $DATA/imagenet-adversarial/imagenet-a/<wnid>/*      + classnames.txt   (200 classes)
    $DATA/imagenet-rendition/imagenet-r/<wnid>/*        + classnames.txt   (200 classes)

``classnames.txt`` is CoOp's copy of CLIP's ImageNet class names; when a variant's folder lacks it,
``$DATA/imagenet/classnames.txt`` is used.

Labels follow CoOp: ImageNet, -Sketch, -A and -R number their sorted class folders ``0..``; ImageNet-V2's
folders are the class indices themselves. -A and -R therefore have 200 classes, named after their folders.

Deviations from the reference implementation (KaiyangZhou/CoOp ``datasets/imagenet*.py``):
    * ImageNet has no validation split by default: CoOp uses its val set (the test set) for validation too, which
      selects on test. ``val_from_test=True`` reproduces that, explicitly.
    * Images within a class folder are read in sorted order; CoOp uses ``os.listdir`` order, which depends on the
      file system, so CoOp's ImageNet few-shot subset is not reproducible across machines to begin with.
    * ImageNet's val labels are looked up by wnid from the train folders (CoOp numbers the val folders on
      their own, which silently mislabels when a folder is missing).
"""

from __future__ import annotations

import os

from ._io import abs_root, dataset_dir, list_files, list_subdirs, read_lines, require_dir
from .base import DatasetSplits, Datum
from .registry import register_dataset

_HINT = "see CoOp's DATASETS.md"


def read_classnames(path: str, name: str) -> dict[str, str]:
    """``{wnid: class name}`` in file order from a ``classnames.txt`` (``<wnid> <class name>`` a line)."""
    out = {}
    for lineno, line in read_lines(path, name, "class-name file"):
        wnid, _, cname = line.partition(" ")
        if not cname:
            raise ValueError(f"{name}: {path}:{lineno}: expected '<wnid> <class name>', got {line!r}")
        out[wnid] = cname.strip()
    return out


def _find_classnames(ddir: str, root: str, name: str) -> dict[str, str]:
    candidates = [os.path.join(ddir, "classnames.txt"), os.path.join(abs_root(root), "imagenet", "classnames.txt")]
    for path in candidates:
        if os.path.isfile(path):
            return read_classnames(path, name)
    raise ValueError(f"{name}: missing class-name file: looked for {' and '.join(candidates)} "
                     "(CoOp's imagenet/classnames.txt, '<wnid> <class name>' a line)")


def _read_class_folders(split_dir: str, wnid_to_label: dict[str, int], names: dict[str, str],
                        name: str) -> list[Datum]:
    items = []
    for wnid in list_subdirs(split_dir):
        if wnid not in wnid_to_label:
            raise ValueError(f"{name}: class folder {os.path.join(split_dir, wnid)} is not an ImageNet class of "
                             "classnames.txt / the train folders")
        cdir = os.path.join(split_dir, wnid)
        items.extend(Datum(os.path.join(cdir, f), wnid_to_label[wnid], names[wnid]) for f in list_files(cdir))
    return items


def _wnid_labels(folders: list[str], names: dict[str, str], where: str, name: str) -> dict[str, int]:
    unknown = [f for f in folders if f not in names]
    if unknown:
        raise ValueError(f"{name}: class folders {unknown[:5]} in {where} are not in classnames.txt")
    if not folders:
        raise ValueError(f"{name}: {where} has no class folders")
    return {wnid: i for i, wnid in enumerate(folders)}


@register_dataset("imagenet")
def imagenet(root: str, val_from_test: bool = False) -> DatasetSplits:
    """ImageNet-1k in CoOp's layout; its val set is the test split.

    Args:
        root: Folder holding ``imagenet/``.
        val_from_test: Also use the test split as validation, as CoOp does (selection on test: only to reproduce
            published numbers). By default the validation split is empty.

    Raises:
        ValueError: If a folder or ``classnames.txt`` is missing, or a class folder is not in it.
    """
    name = "imagenet"
    ddir = dataset_dir(root, "imagenet", name, _HINT)
    names = _find_classnames(ddir, root, name)
    train_dir = require_dir(os.path.join(ddir, "images", "train"), name, "training images folder")
    test_dir = require_dir(os.path.join(ddir, "images", "val"), name, "validation images folder (used as test)")
    wnid_to_label = _wnid_labels(list_subdirs(train_dir), names, train_dir, name)
    train = _read_class_folders(train_dir, wnid_to_label, names, name)
    test = _read_class_folders(test_dir, wnid_to_label, names, name)
    classnames = [names[w] for w in wnid_to_label]
    return DatasetSplits(name, train, list(test) if val_from_test else [], test, classnames, root=ddir)


def _test_only(name: str, folder: str, image_folder: str, root: str) -> DatasetSplits:
    ddir = dataset_dir(root, folder, name, _HINT)
    names = _find_classnames(ddir, root, name)
    image_dir = require_dir(os.path.join(ddir, image_folder), name, "image folder")
    wnid_to_label = _wnid_labels(list_subdirs(image_dir), names, image_dir, name)
    test = _read_class_folders(image_dir, wnid_to_label, names, name)
    return DatasetSplits(name, [], [], test, [names[w] for w in wnid_to_label], root=ddir)


@register_dataset("imagenetv2")
def imagenetv2(root: str) -> DatasetSplits:
    """ImageNet-V2 matched-frequency (test only, 1000 classes; folder ``k`` holds class ``k``)."""
    name = "imagenetv2"
    ddir = dataset_dir(root, "imagenetv2", name, _HINT)
    names = list(_find_classnames(ddir, root, name).values())
    image_dir = require_dir(os.path.join(ddir, "imagenetv2-matched-frequency-format-val"), name, "image folder")
    test = []
    folders = list_subdirs(image_dir)
    bad = [f for f in folders if not (f.isdigit() and int(f) < len(names))]
    if bad or not folders:
        raise ValueError(f"{name}: {image_dir} must hold class folders 0..{len(names) - 1}; unexpected: {bad[:5]}")
    for folder in sorted(folders, key=int):
        label = int(folder)
        cdir = os.path.join(image_dir, folder)
        test.extend(Datum(os.path.join(cdir, f), label, names[label]) for f in list_files(cdir))
    return DatasetSplits(name, [], [], test, names, root=ddir)


@register_dataset("imagenet_sketch")
def imagenet_sketch(root: str) -> DatasetSplits:
    """ImageNet-Sketch (test only, 1000 classes) from ``root/imagenet-sketch/images/<wnid>/``."""
    return _test_only("imagenet_sketch", "imagenet-sketch", "images", root)


@register_dataset("imagenet_a")
def imagenet_a(root: str) -> DatasetSplits:
    """ImageNet-A (test only, its 200 classes: the sorted folder names) from ``root/imagenet-adversarial/``."""
    return _test_only("imagenet_a", "imagenet-adversarial", "imagenet-a", root)


@register_dataset("imagenet_r")
def imagenet_r(root: str) -> DatasetSplits:
    """ImageNet-R (test only, its 200 classes: the sorted folder names) from ``root/imagenet-rendition/``."""
    return _test_only("imagenet_r", "imagenet-rendition", "imagenet-r", root)


IMAGENET_VARIANTS: tuple[str, ...] = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")

