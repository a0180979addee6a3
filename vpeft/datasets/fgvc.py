"""The FGVC benchmark of VPT (CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars).

Each dataset folder holds its images plus VPT's split files ``train.json``, ``val.json`` and ``test.json``, each
mapping an image path (relative to the image folder) to a class id. Image folders as in VPT's ``json_dataset.py``:

    ==================== ===================== =======================
    name                 default folder        image folder inside it
    ==================== ===================== =======================
    cub                  CUB_200_2011          images/
    nabirds              nabirds               images/
    oxford_flowers_fgvc  OxfordFlower          (the folder itself)
    stanford_dogs        Stanford-dogs         Images/
    stanford_cars_fgvc   Stanford-cars         (the folder itself)
    ==================== ===================== =======================

VPT reads the folder from a config path, so there is no canonical folder name; pass ``dataset_dir=`` (a name under
``root`` or an absolute path) when yours differs.

Deviations from the reference implementation (KMnP/vpt ``src/data/datasets/json_dataset.py``):
    * Class ids are made contiguous once, from the ids of ``train.json``; VPT does it per split file, which
      mislabels a split that lacks a class. A val/test id unseen in training is an error.
    * Class names are derived from the class folders when each class has its own (CUB ``001.Black_footed_Albatross``
      -> ``Black footed Albatross``, Dogs ``n02085620-Chihuahua`` -> ``Chihuahua``), else the class id as a string.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from ._io import abs_root, check_exist, dataset_dir, read_json
from .base import DatasetSplits, Datum
from .registry import register_dataset

# name -> (default folder under root, image folder inside it)
FGVC_DATASETS: dict[str, tuple[str, str]] = {
    "cub": ("CUB_200_2011", "images"),
    "nabirds": ("nabirds", "images"),
    "oxford_flowers_fgvc": ("OxfordFlower", ""),
    "stanford_dogs": ("Stanford-dogs", "Images"),
    "stanford_cars_fgvc": ("Stanford-cars", ""),
}


def _clean_folder_name(folder: str) -> str:
    folder = re.sub(r"^(\d+\.|n\d+-)", "", folder)  # CUB's "001." and Stanford Dogs' "n02085620-" prefixes
    return folder.replace("_", " ").strip()


def _class_names(anno: dict[str, int], ids: list[int]) -> list[str]:
    folders: dict[int, set[str]] = {}
    for relpath, cid in anno.items():
        folders.setdefault(cid, set()).add(os.path.dirname(relpath.replace("\\", "/")))
    per_class = [folders[c] for c in ids]
    names = [next(iter(f)) for f in per_class if len(f) == 1 and next(iter(f))]
    if len(names) == len(ids) and len(set(names)) == len(ids):
        return [_clean_folder_name(os.path.basename(n)) for n in names]
    return [str(c) for c in ids]


def read_fgvc(root: str, name: str, dataset_dir_: Optional[str] = None) -> DatasetSplits:
    """Read one FGVC dataset of :data:`FGVC_DATASETS` (see the module docstring)."""
    default_folder, image_folder = FGVC_DATASETS[name]
    folder = dataset_dir_ or default_folder
    if os.path.isabs(os.path.expanduser(folder)):
        ddir = dataset_dir(os.path.dirname(abs_root(folder)), os.path.basename(abs_root(folder)), name)
    else:
        ddir = dataset_dir(root, folder, name, "pass dataset_dir= if your folder is named differently")
    image_dir = os.path.normpath(os.path.join(ddir, image_folder))
    annos = {}
    for split in ("train", "val", "test"):
        path = os.path.join(ddir, f"{split}.json")
        anno = read_json(path, name)
        if not isinstance(anno, dict):
            raise ValueError(f"{name}: split file {path} must map image paths to class ids")
        try:
            annos[split] = {str(k): int(v) for k, v in anno.items()}
        except (TypeError, ValueError):
            raise ValueError(f"{name}: split file {path} has a non-integer class id") from None
    ids = sorted(set(annos["train"].values()))
    if not ids:
        raise ValueError(f"{name}: {os.path.join(ddir, 'train.json')} is empty")
    cont = {cid: i for i, cid in enumerate(ids)}
    classnames = _class_names(annos["train"], ids)
    splits = []
    for split in ("train", "val", "test"):
        unseen = sorted({c for c in annos[split].values() if c not in cont})
        if unseen:
            raise ValueError(f"{name}: {split}.json uses class ids {unseen[:10]} that train.json does not have")
        splits.append([Datum(os.path.join(image_dir, p), cont[c], classnames[cont[c]])
                       for p, c in annos[split].items()])
    check_exist(name, *splits)
    return DatasetSplits(name, splits[0], splits[1], splits[2], classnames, root=ddir)


def _make_reader(name: str):
    def reader(root: str, dataset_dir: Optional[str] = None) -> DatasetSplits:
        return read_fgvc(root, name, dataset_dir)

    folder, image_folder = FGVC_DATASETS[name]
    reader.__name__ = reader.__qualname__ = f"read_{name}"
    reader.__doc__ = (f"FGVC {name} from ``root/{folder}/`` (or ``dataset_dir``) with VPT's train/val/test.json; "
                      f"images under ``{image_folder or '.'}``.")
    return reader


for _name in FGVC_DATASETS:
    register_dataset(_name)(_make_reader(_name))
