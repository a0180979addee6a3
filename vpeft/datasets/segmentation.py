"""Semantic-segmentation data: image + mask folders, Synapse-style ``.npz`` slices, few-shot subsets, a data module.

Folder layout (``format="folder"``)::

    root/train/images/case01.png   root/train/masks/case01.png
    root/val/images/...            root/val/masks/...          (optional)
    root/test/images/...           root/test/masks/...         (optional)

Images and masks pair by file stem (any image extension PIL reads; masks are PNGs). A mask holds one value per pixel
(mode ``L``, ``P`` palette indices, ``I`` or ``1``); ``class_map`` maps pixel values to class ids (e.g.
``{0: 0, 255: 1}``); without one the pixel value is the class id. Class 0 is the background.

Synapse layout (``format="npz"``, the SAMed / TransUNet protocol): ``root/<split>/*.npz`` each holding ``image``
(``H x W`` float, already clipped to [-125, 275] HU and scaled to [0, 1]) and ``label`` (``H x W`` class ids). The
image is served as a grey RGB image on the 0..255 scale.

Every sample is ``(image, label)``: ``image`` a ``(3, h, w)`` float tensor, RGB on the 0..255 scale (what
:class:`vpeft.backbones.sam.SamModel` normalises itself), ``label`` a ``(h', w')`` int64 map. ``resize="square"``
(SAMed) resizes both to ``image_size x image_size``; ``resize="longest"`` (SAM) resizes the longer side of the image to
``image_size`` and keeps the mask at its own resolution (the task upsamples its logits to the mask), so batches need
images of one size then.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .base import DatasetSplits, Datum
from .datamodule import record_manifest, seeded_train_loader, trainer_world

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")


# -- readers -----------------------------------------------------------------------------------------------------------
def list_pairs(folder: str, images_dir: str = "images", masks_dir: str = "masks") -> list[tuple[str, str]]:
    """``(image path, mask path)`` pairs of ``folder/images`` and ``folder/masks``, sorted by stem.

    Raises:
        ValueError: a missing or empty image folder, or images without a mask (named).
    """
    img_dir, msk_dir = os.path.join(folder, images_dir), os.path.join(folder, masks_dir)
    if not os.path.isdir(img_dir):
        raise ValueError(f"segmentation folder {folder!r} has no {images_dir!r} sub-folder")
    images = {os.path.splitext(f)[0]: os.path.join(img_dir, f) for f in sorted(os.listdir(img_dir))
              if f.lower().endswith(IMAGE_EXTENSIONS)}
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {img_dir!r}")
    masks = {}
    if os.path.isdir(msk_dir):
        masks = {os.path.splitext(f)[0]: os.path.join(msk_dir, f) for f in sorted(os.listdir(msk_dir))
                 if f.lower().endswith(".png")}
    missing = sorted(set(images) - set(masks))
    if missing:
        raise ValueError(f"{len(missing)} images in {img_dir!r} have no PNG mask in {msk_dir!r} (same file stem), "
                         f"e.g. {missing[:4]}")
    return [(images[s], masks[s]) for s in sorted(images)]


def read_mask(path: str, class_map: Optional[Mapping[int, int]], num_classes: Optional[int]) -> np.ndarray:
    """A PNG mask as an ``(H, W)`` int64 class-id map.

    Raises:
        ValueError: an RGB(A) mask, pixel values missing from ``class_map``, or (without a map) values
            ``>= num_classes``; the file and the values are named.
    """
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16", "1"):
            raise ValueError(f"mask {path!r} has mode {im.mode}: masks must hold one class value per pixel "
                             "(greyscale or palette PNG), not colours")
        values = np.asarray(im, dtype=np.int64)
    if class_map is not None:
        keys = np.array(sorted(class_map), dtype=np.int64)
        found = np.unique(values)
        unknown = found[~np.isin(found, keys)]
        if unknown.size:
            raise ValueError(f"mask {path!r} holds pixel values {unknown[:8].tolist()} missing from class_map "
                             f"(mapped values: {keys[:16].tolist()})")
        lut = np.zeros(int(max(keys.max(), found.max())) + 1, dtype=np.int64)
        for k, c in class_map.items():
            lut[int(k)] = int(c)
        return lut[values]
    if num_classes is not None and values.size and (values.max() >= num_classes or values.min() < 0):
        bad = np.unique(values[(values >= num_classes) | (values < 0)])
        raise ValueError(f"mask {path!r} holds class ids {bad[:8].tolist()} outside [0, {num_classes}) (pass a "
                         "class_map from pixel values to class ids)")
    return values


def read_image(path: str) -> torch.Tensor:
    """An image as a ``(3, H, W)`` float tensor, RGB on the 0..255 scale (grey images are repeated)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def read_npz_slice(path: str) -> tuple[torch.Tensor, np.ndarray]:
    """A Synapse-style slice: ``image`` in [0, 1] -> grey RGB on 0..255, ``label`` -> int64 map.

    Raises:
        ValueError: missing ``image``/``label`` arrays, not 2-D, or of different sizes.
    """
    with np.load(path) as z:
        if "image" not in z or "label" not in z:
            raise ValueError(f"{path!r} must hold 'image' and 'label' arrays, has {sorted(z.files)}")
        image, label = np.asarray(z["image"], dtype=np.float32), np.asarray(z["label"])
    if image.ndim != 2 or label.shape != image.shape:
        raise ValueError(f"{path!r}: 'image' and 'label' must be 2-D of one size, got {image.shape} and "
                         f"{label.shape}")
    img = torch.from_numpy(np.clip(image, 0.0, 1.0) * 255.0)[None].repeat(3, 1, 1)
    return img, label.astype(np.int64)


# -- the dataset -------------------------------------------------------------------------------------------------------
class SegmentationDataset(Dataset):
    """Samples ``(image (3, h, w) float 0..255, label (h', w') int64)`` from a list of files.

    Args:
        items: ``(image path, mask path)`` pairs (``format="folder"``) or ``.npz`` paths (``format="npz"``).
        num_classes: ``K``; class ids must lie in ``[0, K)``.
        class_map: Pixel value -> class id (folder masks).
        image_size: Target size (see ``resize``); ``None`` keeps the files' size.
        resize: ``"square"``: image and mask to ``image_size x image_size``; ``"longest"``: the image's longer side
            to ``image_size``, the mask unchanged.
        augment: Random horizontal/vertical flips and 90-degree rotations (image and mask together; SAMed's random
            rotation and flip, on the right-angle grid). Draws from torch's global RNG, which
            ``SeededAugmentDataset`` seeds per sample.
        fmt: ``"folder"`` or ``"npz"``.
    """

    def __init__(self, items: list, num_classes: int, class_map: Optional[Mapping[int, int]] = None,
                 image_size: Optional[int] = None, resize: str = "square", augment: bool = False,
                 fmt: str = "folder") -> None:
        if resize not in ("square", "longest"):
            raise ValueError(f"resize must be 'square' or 'longest', got {resize!r}")
        self.items, self.num_classes, self.class_map = list(items), int(num_classes), class_map
        self.image_size, self.resize, self.augment, self.fmt = image_size, resize, augment, fmt

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample at its file resolution (no resizing or augmentation), sizes and class ids checked."""
        item = self.items[index]
        if self.fmt == "npz":
            image, label = read_npz_slice(item)
            name = item
            if label.size and (label.max() >= self.num_classes or label.min() < 0):
                raise ValueError(f"{item!r}: label holds class ids {np.unique(label)[-4:].tolist()} outside "
                                 f"[0, {self.num_classes})")
        else:
            image_path, mask_path = item
            image, label = read_image(image_path), read_mask(mask_path, self.class_map, self.num_classes)
            name = f"{image_path!r} / {mask_path!r}"
            if self.class_map is not None and label.size and label.max() >= self.num_classes:
                raise ValueError(f"class_map maps {mask_path!r} to class ids >= num_classes={self.num_classes}")
        if tuple(image.shape[-2:]) != tuple(label.shape):
            raise ValueError(f"image and mask sizes differ for {name}: image {tuple(image.shape[-2:])}, mask "
                             f"{tuple(label.shape)} (height, width)")
        return image, torch.from_numpy(label)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.load(index)
        if self.augment:
            if torch.rand(()) < 0.5:
                image, label = image.flip(-1), label.flip(-1)
            if torch.rand(()) < 0.5:
                image, label = image.flip(-2), label.flip(-2)
            k = int(torch.randint(0, 4, ()))
            image, label = torch.rot90(image, k, (-2, -1)), torch.rot90(label, k, (-2, -1))
        if self.image_size is not None:
            s = int(self.image_size)
            if self.resize == "square":
                size = (s, s)
            else:
                h, w = image.shape[-2:]
                scale = s / max(h, w)
                size = (int(h * scale + 0.5), int(w * scale + 0.5))  # SAM's ResizeLongestSide rounding
            if tuple(image.shape[-2:]) != size:
                image = F.interpolate(image[None], size, mode="bilinear", align_corners=False, antialias=True)[0]
                if self.resize == "square":
                    label = F.interpolate(label[None, None].float(), size, mode="nearest-exact")[0, 0].long()
        return image.contiguous().clamp_(0, 255), label.contiguous()


def collate_segmentation(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(image, label)`` samples; differing sizes raise a ``ValueError`` naming the fix."""
    sizes = {(tuple(i.shape), tuple(lab.shape)) for i, lab in batch}
    if len(sizes) > 1:
        raise ValueError(f"a batch holds images/masks of different sizes {sorted(sizes)[:4]}: use resize='square', "
                         "resize the files to one size, or batch_size=1")
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


def read_segmentation_splits(root: str, fmt: str = "folder", images_dir: str = "images",
                             masks_dir: str = "masks") -> dict[str, list]:
    """The files of each split present under ``root`` (``train`` is required).

    Raises:
        ValueError: no ``root/train`` folder, or an empty one.
    """
    if fmt not in ("folder", "npz"):
        raise ValueError(f"format must be 'folder' or 'npz', got {fmt!r}")
    if not os.path.isdir(os.path.join(root, "train")):
        raise ValueError(f"segmentation root {root!r} has no 'train' folder (layout: root/train/{images_dir}, "
                         f"root/train/{masks_dir}, optional val/ and test/)")
    out: dict[str, list] = {}
    for split in SPLITS:
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            out[split] = []
            continue
        if fmt == "folder":
            out[split] = list_pairs(folder, images_dir, masks_dir)
        else:
            files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".npz"))
            if not files:
                raise ValueError(f"no .npz slices in {folder!r}")
            out[split] = files
    return out


def fewshot_items(items: list, shots: int, seed: int) -> list:
    """``shots`` labelled training items drawn with ``random.Random(seed)`` (sorted order kept); ``<= 0``: all.

    Raises:
        ValueError: fewer items than ``shots``.
    """
    if shots <= 0:
        return list(items)
    if shots > len(items):
        raise ValueError(f"shots={shots} labelled images requested, but the training split has {len(items)}")
    picked = sorted(random.Random(seed).sample(range(len(items)), shots))
    return [items[i] for i in picked]


def segmentation_manifest(name: str, root: str, splits: dict[str, list], **meta: Any) -> dict:
    """A split manifest in :func:`vpeft.datasets.build_manifest`'s format (ids: image paths relative to ``root``;
    every label is 0: the masks are not part of the id)."""
    from .fewshot import build_manifest

    def data(items: list) -> list[Datum]:
        return [Datum(it if isinstance(it, str) else it[0], 0, "") for it in items]

    ds = DatasetSplits(name, data(splits["train"]), data(splits["val"]), data(splits["test"]), [], root)
    return build_manifest(ds, **meta)


# -- the data module ---------------------------------------------------------------------------------------------------
try:
    from lightning.pytorch import LightningDataModule
except ImportError:  # pragma: no cover - Lightning is optional for the readers
    LightningDataModule = object  # type: ignore[assignment,misc]


class SegmentationDataModule(LightningDataModule):
    """Image + mask folders (or Synapse ``.npz`` slices), ``shots`` labelled training images, SAM-sized inputs.

    The training subset is drawn with ``seed`` and described by a manifest (:attr:`manifest_hash`) written during
    ``setup`` like :class:`~vpeft.datasets.datamodule.FewShotDataModule`'s (an existing manifest with another hash is
    an error). Shuffling and augmentation are seeded per ``(seed, epoch, index)`` with that module's sampler.

    Args:
        root: Dataset folder (see the module doc for the layout).
        num_classes: ``K`` including the background; default ``max(class_map values) + 1`` (required without
            ``class_map``).
        class_map: Pixel value -> class id for folder masks (e.g. ``{0: 0, 255: 1}``).
        format: ``"folder"`` or ``"npz"``.
        shots: Labelled training images (``<= 0``: all).
        seed: Few-shot sampling, shuffle and augmentation seed.
        batch_size: Training batch size.
        eval_batch_size: Validation/test batch size (default ``batch_size``).
        num_workers: Data-loader workers.
        backbone: Backbone id (linked by the CLI); SAM's ``img_size`` comes from ``backbone_kwargs``.
        backbone_kwargs: The backbone's kwargs (``img_size``, default 1024).
        image_size: Override of the input size.
        resize: ``"square"`` (SAMed) or ``"longest"`` (SAM), see :class:`SegmentationDataset`.
        augment: Random flips / right-angle rotations for training.
        manifest_dir: Manifest folder; default ``<trainer.default_root_dir>/manifests``.
        images_dir: Image sub-folder name.
        masks_dir: Mask sub-folder name.
    """

    def __init__(
            self,
            root: str,
            num_classes: Optional[int] = None,
            class_map: Optional[dict[int, int]] = None,
            format: str = "folder",  # noqa: A002  (the config key users write)
            shots: int = 0,
            seed: int = 1,
            batch_size: int = 8,
            eval_batch_size: Optional[int] = None,
            num_workers: int = 0,
            backbone: Optional[str] = None,
            backbone_kwargs: Optional[dict[str, Any]] = None,
            image_size: Optional[int] = None,
            resize: str = "square",
            augment: bool = False,
            manifest_dir: Optional[str] = None,
            images_dir: str = "images",
            masks_dir: str = "masks",
    ) -> None:
        super().__init__()
        if format not in ("folder", "npz"):
            raise ValueError(f"format must be 'folder' or 'npz', got {format!r}")
        if resize not in ("square", "longest"):
            raise ValueError(f"resize must be 'square' or 'longest', got {resize!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if class_map is not None:
            class_map = {int(k): int(v) for k, v in dict(class_map).items()}
            if not class_map or min(class_map.values()) < 0:
                raise ValueError(f"class_map must map pixel values to class ids >= 0, got {class_map}")
            if num_classes is None:
                num_classes = max(class_map.values()) + 1
            elif max(class_map.values()) >= num_classes:
                raise ValueError(f"class_map has class ids up to {max(class_map.values())}, but num_classes is "
                                 f"{num_classes}")
        if num_classes is None or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (classes including the background; or give a "
                             f"class_map), got {num_classes!r}")
        self.save_hyperparameters()
        self.root, self._num_classes, self.class_map, self.format = root, num_classes, class_map, format
        self.shots, self.seed = shots, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers = num_workers
        self.backbone, self.backbone_kwargs = backbone, dict(backbone_kwargs or {})
        self._image_size, self.resize, self.augment = image_size, resize, augment
        self.manifest_dir, self.images_dir, self.masks_dir = manifest_dir, images_dir, masks_dir
        self._splits: Optional[dict[str, list]] = None
        self._manifest: Optional[dict] = None
        self.manifest_path: Optional[str] = None
        self.train_set = self.val_set = self.test_set = None

    @property
    def num_classes(self) -> int:
        """``K`` including the background (the CLI links it to ``model.num_classes``)."""
        return self._num_classes

    @property
    def image_size(self) -> int:
        """The input size: ``image_size``, else the backbone's ``img_size`` (SAM: 1024)."""
        if self._image_size is not None:
            return int(self._image_size)
        return int(self.backbone_kwargs.get("img_size", 1024))

    @property
    def splits(self) -> dict[str, list]:
        """The files of each split, training subset sampled."""
        if self._splits is None:
            full = read_segmentation_splits(self.root, self.format, self.images_dir, self.masks_dir)
            full["train"] = fewshot_items(full["train"], self.shots, self.seed)
            self._splits = full
        return self._splits

    @property
    def manifest(self) -> dict:
        """The split manifest (ids + hash)."""
        if self._manifest is None:
            self._manifest = segmentation_manifest(f"segmentation:{os.path.basename(os.path.normpath(self.root))}",
                                                   self.root, self.splits, shots=self.shots, seed=self.seed)
        return self._manifest

    @property
    def manifest_hash(self) -> str:
        """SHA-256 of the sampled subset."""
        return self.manifest["hash"]

    def _dataset(self, split: str, augment: bool) -> SegmentationDataset:
        return SegmentationDataset(self.splits[split], self.num_classes, self.class_map, self.image_size,
                                   self.resize, augment, self.format)

    def setup(self, stage: str) -> None:
        """Build the stage's datasets; on global rank 0 write (or check) the manifest."""
        if stage == "fit":
            self.train_set = self._dataset("train", self.augment)
        if stage in ("fit", "validate"):
            self.val_set = self._dataset("val", False)
            if not len(self.val_set):
                logger.warning("%s has no val/ split: checkpoint selection cannot use validation data", self.root)
        if stage == "test":
            self.test_set = self._dataset("test", False)
            if not len(self.test_set):
                raise ValueError(f"{self.root!r} has no test/ split to test on")
        self._write_manifest()

    def _write_manifest(self) -> None:
        root = os.path.basename(os.path.normpath(self.root))
        name = f"segmentation_{root}_{self.shots}shot_seed{self.seed}.json"
        self.manifest_path = record_manifest(self.manifest, self.manifest_hash, self.manifest_dir, self.trainer, name,
                                             f"the sampled subset of {self.root!r}")

    def train_dataloader(self) -> DataLoader:
        """Seeded shuffle and per-sample augmentation (see ``FewShotDataModule``)."""
        if self.train_set is None:
            self.setup("fit")
        return seeded_train_loader(self.train_set, self.seed, self.batch_size, self.num_workers,
                                   trainer_world(self.trainer), collate_fn=collate_segmentation)

    def _eval_loader(self, data) -> DataLoader:
        return DataLoader(data, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=collate_segmentation)

    def val_dataloader(self) -> DataLoader:  # noqa: D102
        if self.val_set is None:
            self.setup("validate")
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:  # noqa: D102
        if self.test_set is None:
            self.setup("test")
        return self._eval_loader(self.test_set)
