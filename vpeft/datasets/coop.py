"""Readers for the datasets of CoOp's few-shot protocol in their standard on-disk layouts (CoOp's DATASETS.md).

``root`` is the folder holding every dataset directory (CoOp's ``$DATA``)::

    $DATA/caltech-101/101_ObjectCategories/...           + split_zhou_Caltech101.json
    $DATA/oxford_pets/images/...                         + split_zhou_OxfordPets.json
    $DATA/stanford_cars/{cars_train,cars_test}/...       + split_zhou_StanfordCars.json (paths relative to the folder)
    $DATA/oxford_flowers/jpg/...                         + split_zhou_OxfordFlowers.json
    $DATA/food-101/images/...                            + split_zhou_Food101.json
    $DATA/sun397/SUN397/...                              + split_zhou_SUN397.json
    $DATA/dtd/images/...                                 + split_zhou_DescribableTextures.json
    $DATA/eurosat/2750/...                               + split_zhou_EuroSAT.json
    $DATA/ucf101/UCF-101-midframes/...                   + split_zhou_UCF101.json
    $DATA/fgvc_aircraft/images/*.jpg                     + variants.txt, images_variant_{train,val,test}.txt
    $DATA/imagenet/images/{train,val}/<wnid>/...         + classnames.txt   (see ``imagenet.py``)

A ``split_zhou_<Name>.json`` holds ``{"train": [[relpath, label, classname], ...], "val": [...], "test": [...]}``
with ``relpath`` relative to the image folder; the item order is kept, since few-shot sampling depends on it.

Deviations from the reference implementation (KaiyangZhou/CoOp ``datasets/``):
    * A missing split file is an error: CoOp would create a new random split and save it, which silently
      gives a different dataset from the published one.
    * Every image named by a split must exist (checked when reading, the error names the files), as Dassl's
      ``Datum`` asserts.
    * Class names come from all three splits (CoOp: train only); a label with two names is an error.
"""

from __future__ import annotations

import os
from typing import Callable

from ._io import check_exist, classnames_from, dataset_dir, read_json, read_lines, require_dir
from .base import DatasetSplits, Datum
from .registry import register_dataset

# name -> (dataset folder under root, image folder inside it, split file, CoOp's class name for the dataset)
COOP_SPLIT_DATASETS: dict[str, tuple[str, str, str, str]] = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", "Caltech101"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json", "OxfordPets"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json", "StanfordCars"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", "OxfordFlowers"),
    "food101": ("food-101", "images", "split_zhou_Food101.json", "Food101"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json", "SUN397"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json", "DescribableTextures"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json", "EuroSAT"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "UCF101"),
}

#: The 11 datasets of CoOp's few-shot benchmark, in the paper's order.
COOP_DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                 "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")

_HINT = "see CoOp's DATASETS.md for each dataset's layout"


def read_split_json(path: str, image_dir: str, name: str) -> tuple[list[Datum], list[Datum], list[Datum]]:
    """Read a ``split_zhou_*.json`` file; image paths are joined to ``image_dir``.

    Raises:
        ValueError: If the file is missing (naming it) or malformed.
    """
    split = read_json(path, name)
    if not isinstance(split, dict) or any(k not in split for k in ("train", "val", "test")):
        raise ValueError(f"{name}: split file {path} must be a JSON object with 'train', 'val' and 'test' lists")
    out = []
    for key in ("train", "val", "test"):
        items = []
        for i, entry in enumerate(split[key]):
            if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
                raise ValueError(f"{name}: {path} [{key!r}][{i}] should be [relpath, label, classname], got {entry!r}")
            relpath, label, classname = entry
            items.append(Datum(os.path.join(image_dir, relpath), int(label), str(classname)))
        out.append(items)
    return out[0], out[1], out[2]


def _make_split_reader(name: str) -> Callable[[str], DatasetSplits]:
    folder, image_folder, split_file, _ = COOP_SPLIT_DATASETS[name]

    def reader(root: str) -> DatasetSplits:
        ddir = dataset_dir(root, folder, name, _HINT)
        split_path = os.path.join(ddir, split_file)
        image_dir = require_dir(os.path.normpath(os.path.join(ddir, image_folder)), name, "image folder")
        train, val, test = read_split_json(split_path, image_dir, name)
        check_exist(name, train, val, test)
        return DatasetSplits(name, train, val, test, classnames_from(name, train, val, test), root=ddir)

    reader.__name__ = reader.__qualname__ = f"read_{name}"
    images = f"{folder}/{image_folder}/" if image_folder else f"{folder}/"
    reader.__doc__ = (f"Read {name} from ``root/{folder}/`` (images under ``{images}``, split ``{split_file}``).\n\n"
                      "Raises:\n    ValueError: If the folder, the split file or an image is missing.")
    return reader


for _name in COOP_SPLIT_DATASETS:
    register_dataset(_name)(_make_split_reader(_name))


@register_dataset("fgvc_aircraft")
def fgvc_aircraft(root: str) -> DatasetSplits:
    """FGVC-Aircraft (variant level, 100 classes) with its official train / val / test split.

    Layout (the archive's ``data/`` renamed, as in CoOp): ``root/fgvc_aircraft/images/<id>.jpg``,
    ``variants.txt`` (one class name a line; label = line position) and ``images_variant_{train,val,test}.txt``
    (``<id> <variant name>`` a line).

    Raises:
        ValueError: If a file is missing or a line names an unknown variant.
    """
    name = "fgvc_aircraft"
    ddir = dataset_dir(root, "fgvc_aircraft", name, _HINT)
    image_dir = require_dir(os.path.join(ddir, "images"), name, "image folder")
    classnames = [line for _, line in read_lines(os.path.join(ddir, "variants.txt"), name, "class list")]
    cname2lab = {c: i for i, c in enumerate(classnames)}
    splits = []
    for split in ("train", "val", "test"):
        path = os.path.join(ddir, f"images_variant_{split}.txt")
        items = []
        for lineno, line in read_lines(path, name):
            imid, _, variant = line.partition(" ")
            if variant not in cname2lab:
                raise ValueError(f"{name}: {path}:{lineno}: variant {variant!r} is not in variants.txt")
            items.append(Datum(os.path.join(image_dir, imid + ".jpg"), cname2lab[variant], variant))
        splits.append(items)
    check_exist(name, *splits)
    return DatasetSplits(name, splits[0], splits[1], splits[2], classnames, root=ddir)
