"""Tiny fake datasets in CoOp's on-disk layouts, and Dassl's few-shot sampler re-implemented for reference.

Written from CoOp's DATASETS.md and Dassl's ``generate_fewshot_dataset`` semantics, independently of
``vpeft.datasets``, so tests can check the library against them. Import as ``from fake_coop import make_fake_coop``
(``tests/`` is on ``sys.path`` through its conftest; a ``datasets`` package name would clash with HF datasets).

Images are ``size x size`` with one colour per class plus a little noise, so a tiny model can learn them.
"""

from __future__ import annotations

import colorsys
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from PIL import Image

# dataset -> (folder under root, image folder inside it ("" = the folder itself), split file)
SPLIT_LAYOUTS = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}
OTHER_LAYOUTS = ("fgvc_aircraft", "imagenet")
ALL_COOP = tuple(SPLIT_LAYOUTS) + OTHER_LAYOUTS

Item = tuple[str, int, str]  # (absolute image path, label, class name)


@dataclass
class FakeCoop:
    """What :func:`make_fake_coop` wrote: items in the order of the split files (Dassl's input order)."""

    name: str
    root: str  # the $DATA folder to pass as ``root``
    dataset_dir: str  # root/<dataset folder>
    classnames: list[str]
    train: list[Item] = field(default_factory=list)
    val: list[Item] = field(default_factory=list)
    test: list[Item] = field(default_factory=list)
    split_path: Optional[str] = None  # the split_zhou json, where the dataset has one


def _save(path: str, label: int, n_classes: int, rng: np.random.Generator, size: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    r, g, b = colorsys.hsv_to_rgb(label / max(n_classes, 1), 0.9, 0.9)
    base = np.array([r, g, b]) * 255
    pixels = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    fmt = "JPEG" if path.lower().endswith((".jpg", ".jpeg")) else "PNG"
    Image.fromarray(pixels).save(path, format=fmt)


def make_fake_coop(root, dataset: str = "caltech101", classes: Sequence[str] = ("airplane", "bonsai", "cougar face"),
                   per_class: tuple[int, int, int] = (20, 6, 4), size: int = 8, seed: int = 0) -> FakeCoop:
    """Write a fake ``dataset`` under ``root`` in CoOp's layout.

    Args:
        root: The ``$DATA`` folder (created if needed).
        dataset: A CoOp dataset name (:data:`ALL_COOP`).
        classes: Class names; label ``i`` is ``classes[i]``.
        per_class: Images per class in (train, val, test). ImageNet has no val: its test is the ``val/`` folder.
        size: Image side in pixels.
        seed: Seeds the image noise and the shuffled order of the split files.

    Returns:
        A :class:`FakeCoop` listing what was written.
    """
    root = os.path.abspath(str(root))
    rng = np.random.default_rng(seed)
    order = random.Random(seed)
    n = len(classes)
    if dataset in SPLIT_LAYOUTS:
        folder, image_folder, split_file = SPLIT_LAYOUTS[dataset]
        ddir = os.path.join(root, folder)
        image_dir = os.path.join(ddir, image_folder) if image_folder else ddir
        fake = FakeCoop(dataset, root, ddir, list(classes), split_path=os.path.join(ddir, split_file))
        split_json = {}
        for split, count in zip(("train", "val", "test"), per_class):
            entries = []
            for label, cname in enumerate(classes):
                for i in range(count):
                    if dataset == "stanford_cars":  # Cars' split paths start with cars_train/ or cars_test/
                        sub = "cars_test" if split == "test" else "cars_train"
                        rel = f"{sub}/{label:03d}_{split}_{i:05d}.png"
                    else:
                        rel = f"{cname}/{split}_{i:04d}.png"
                    _save(os.path.join(image_dir, rel), label, n, rng, size)
                    entries.append([rel, label, cname])
            order.shuffle(entries)  # split files list classes interleaved, so first-appearance order matters
            split_json[split] = entries
            setattr(fake, split, [(os.path.join(image_dir, r), y, c) for r, y, c in entries])
        with open(fake.split_path, "w") as f:
            json.dump(split_json, f)
        return fake
    if dataset == "fgvc_aircraft":
        ddir = os.path.join(root, "fgvc_aircraft")
        fake = FakeCoop(dataset, root, ddir, list(classes))
        os.makedirs(os.path.join(ddir, "images"), exist_ok=True)
        with open(os.path.join(ddir, "variants.txt"), "w") as f:
            f.write("".join(f"{c}\n" for c in classes))
        next_id = 1000000
        for split, count in zip(("train", "val", "test"), per_class):
            entries = []
            for label, cname in enumerate(classes):
                for _ in range(count):
                    imid = f"{next_id:07d}"
                    next_id += 1
                    _save(os.path.join(ddir, "images", imid + ".jpg"), label, n, rng, size)
                    entries.append((imid, label, cname))
            order.shuffle(entries)
            with open(os.path.join(ddir, f"images_variant_{split}.txt"), "w") as f:
                f.write("".join(f"{imid} {cname}\n" for imid, _, cname in entries))
            setattr(fake, split, [(os.path.join(ddir, "images", i + ".jpg"), y, c) for i, y, c in entries])
        return fake
    if dataset == "imagenet":
        ddir = os.path.join(root, "imagenet")
        fake = FakeCoop(dataset, root, ddir, list(classes))
        wnids = [f"n{label:08d}" for label in range(n)]  # sorted == label order, as real wnids in classnames.txt
        os.makedirs(ddir, exist_ok=True)
        with open(os.path.join(ddir, "classnames.txt"), "w") as f:
            f.write("".join(f"{w} {c}\n" for w, c in zip(wnids, classes)))
        for split, folder, count in (("train", "train", per_class[0]), ("test", "val", per_class[2])):
            items = []
            for label, (wnid, cname) in enumerate(zip(wnids, classes)):
                for i in range(count):
                    path = os.path.join(ddir, "images", folder, wnid, f"{wnid}_{i:05d}.JPEG")
                    _save(path, label, n, rng, size)
                    items.append((path, label, cname))
            setattr(fake, split, items)
        return fake
    raise ValueError(f"unknown fake dataset {dataset!r}; known: {ALL_COOP}")


def dassl_fewshot(items: Sequence[Item], num_shots: int) -> list[Item]:
    """Dassl's ``generate_fewshot_dataset`` on one source with ``repeat=False``, from its documented semantics:
    group by label in order of first appearance, then ``random.sample(group, K)`` (all of a smaller group)."""
    if num_shots < 1:
        return list(items)
    by_label: dict[int, list[Item]] = {}
    for item in items:
        by_label.setdefault(item[1], []).append(item)
    out: list[Item] = []
    for group in by_label.values():
        out.extend(random.sample(group, num_shots) if len(group) >= num_shots else group)
    return out


def dassl_coop_subset(fake: FakeCoop, shots: int, seed: int) -> tuple[list[Item], list[Item]]:
    """The (train, val) subset CoOp's reader would pick: seed once, K-shot train, then min(K, 4)-shot val."""
    random.seed(seed)
    train = dassl_fewshot(fake.train, shots)
    val = dassl_fewshot(fake.val, min(shots, 4))
    return train, val
