"""Semantic-segmentation data: image + mask folders, Synapse ``.npz`` slices and ``.h5`` volumes, few-shot subsets,
a data module.

Folder layout (``format="folder"``)::

    root/train/images/case01.png   root/train/masks/case01.png
    root/val/images/...            root/val/masks/...          (optional)
    root/test/images/...           root/test/masks/...         (optional)

Images and masks pair by file stem (any image extension PIL reads; masks are PNGs). A mask holds one value per pixel
(mode ``L``, ``P`` palette indices, ``I`` or ``1``); ``class_map`` maps pixel values to class ids (e.g.
``{0: 0, 255: 1}``); without one the pixel value is the class id. Class 0 is the background.

Synapse layout (``format="npz"``, the SAMed / TransUNet protocol): each split folder holds either ``.npz`` slices or
``.h5`` volumes (never both). A slice ``root/<split>/*.npz`` holds ``image`` (``H x W`` float, already clipped to
[-125, 275] HU and scaled to [0, 1]) and ``label`` (``H x W`` class ids). A volume ``root/<split>/*.h5`` (SAMed's
``test_vol_h5/caseXXXX.npy.h5``) holds ``image`` and ``label`` datasets of shape ``D x H x W`` (same scaling; SAMed
stores the labels as integer-valued floats) and expands into its ``D`` slices. SAMed's folders map to
``root/train`` (``train_npz``) and ``root/test`` (``test_vol_h5``). The image is served as a grey RGB image on the
0..255 scale. ``.h5`` files are opened per access (h5py handles must not cross a fork into data-loader workers);
only their shapes are read when the dataset is built.

Every sample is ``(image, label)``: ``image`` a ``(3, h, w)`` float tensor, RGB on the 0..255 scale (what
:class:`vpeft.backbones.sam.SamModel` normalises itself), ``label`` a ``(h', w')`` int64 map. Slices of ``.h5``
volumes are ``(image, label, volume_index, slice_index)``, the indices 0-d int64 tensors (``volume_index``: the
file's position in the dataset's item list, i.e. in the split's sorted file list; ``slice_index``: the position along
``D``), so an evaluation can reassemble the volumes (:class:`vpeft.metrics.VolumeAccumulator`).
``resize="square"`` (SAMed) resizes both to ``image_size x image_size`` (``keep_label_size=True`` leaves the label at
the file's resolution, where SAMed measures Dice and HD95); ``resize="longest"`` (SAM) resizes the longer side of the
image to ``image_size`` and keeps the mask at its own resolution (the task upsamples its logits to the mask), so
batches need images of one size then.

Few-shot subsets (``shots``) draw items of the training split: images, ``.npz`` slices, or, for a training split of
``.h5`` volumes, whole volumes (a labelled case is an annotated volume).
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
from torch.utils.data import Dataset

from ._loaders import SplitLoaders, record_manifest
from .base import DatasetSplits, Datum

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
H5_EXTENSIONS = (".h5", ".hdf5")
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


def class_id_map(label: np.ndarray, name: str) -> np.ndarray:
    """``label`` as int64 class ids; integer-valued floats (SAMed stores its labels as float32) are accepted.

    Raises:
        ValueError: non-integer values (named with the file).
    """
    label = np.asarray(label)
    if np.issubdtype(label.dtype, np.floating) and label.size and not np.array_equal(label, np.round(label)):
        raise ValueError(f"{name}: 'label' must hold integer class ids, got values such as "
                         f"{label[label != np.round(label)][:4].tolist()}")
    if not (np.issubdtype(label.dtype, np.number) or label.dtype == bool):
        raise ValueError(f"{name}: 'label' must hold integer class ids, got dtype {label.dtype}")
    return label.astype(np.int64)


def grey_rgb(image: np.ndarray) -> torch.Tensor:
    """A ``(H, W)`` image in [0, 1] as a ``(3, H, W)`` grey RGB tensor on the 0..255 scale."""
    image = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(np.clip(image, 0.0, 1.0) * 255.0)[None].repeat(3, 1, 1)


def read_npz_slice(path: str) -> tuple[torch.Tensor, np.ndarray]:
    """A Synapse-style slice: ``image`` in [0, 1] -> grey RGB on 0..255, ``label`` -> int64 map.

    Raises:
        ValueError: missing ``image``/``label`` arrays, not 2-D, of different sizes, or non-integer labels.
    """
    with np.load(path) as z:
        if "image" not in z or "label" not in z:
            raise ValueError(f"{path!r} must hold 'image' and 'label' arrays, has {sorted(z.files)}")
        image, label = np.asarray(z["image"], dtype=np.float32), np.asarray(z["label"])
    if image.ndim != 2 or label.shape != image.shape:
        raise ValueError(f"{path!r}: 'image' and 'label' must be 2-D of one size, got {image.shape} and "
                         f"{label.shape}")
    return grey_rgb(image), class_id_map(label, repr(path))


def _require_h5py(path: str):
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - h5py is in the points and dev extras
        raise ImportError(f"{path!r} is an HDF5 volume and needs h5py, which is not installed: "
                          "`pip install h5py`") from e
    return h5py


def _h5_shape(f, path: str) -> tuple[int, int, int]:
    """The ``(D, H, W)`` shape of an open volume, its ``image`` and ``label`` datasets checked."""
    import h5py

    missing = [k for k in ("image", "label") if k not in f]
    if missing:
        raise ValueError(f"{path!r} must hold 'image' and 'label' datasets (D x H x W), has no {missing} "
                         f"(keys: {sorted(f.keys())})")
    image, label = f["image"], f["label"]
    if not isinstance(image, h5py.Dataset) or not isinstance(label, h5py.Dataset):
        raise ValueError(f"{path!r}: 'image' and 'label' must be datasets, not groups")
    ishape, lshape = tuple(image.shape), tuple(label.shape)
    if len(ishape) != 3:
        raise ValueError(f"{path!r}: 'image' must be a 3-D volume (D x H x W), got shape {ishape}")
    if lshape != ishape:
        raise ValueError(f"{path!r}: 'image' {ishape} and 'label' {lshape} must have the same shape (D x H x W)")
    return ishape


def h5_volume_depth(path: str) -> int:
    """The number of slices ``D`` of a Synapse ``.h5`` volume (only the datasets' shapes are read).

    Raises:
        ValueError: no ``image`` or ``label`` dataset (the file's keys are named), not 3-D, or shapes that differ.
    """
    with _require_h5py(path).File(path, "r") as f:
        return _h5_shape(f, path)[0]


def read_h5_slice(path: str, index: int) -> tuple[torch.Tensor, np.ndarray]:
    """Slice ``index`` (along ``D``) of a Synapse ``.h5`` volume: ``image`` in [0, 1] -> grey RGB on 0..255, ``label``
    -> int64 map. Opens and closes the file on every call (h5py handles are not fork-safe; this is safe in workers).

    Raises:
        ValueError: as :func:`h5_volume_depth`, non-integer labels, or ``index`` outside ``[0, D)``.
    """
    with _require_h5py(path).File(path, "r") as f:
        depth = _h5_shape(f, path)[0]
        if not 0 <= index < depth:
            raise ValueError(f"{path!r}: slice {index} outside [0, {depth})")
        image, label = np.asarray(f["image"][index], dtype=np.float32), np.asarray(f["label"][index])
    return grey_rgb(image), class_id_map(label, f"{path!r} slice {index}")


def volume_name(path: str) -> str:
    """``case0001`` for ``.../case0001.npy.h5`` (SAMed's names) or ``.../case0001.h5``."""
    name = os.path.basename(path)
    for ext in (*H5_EXTENSIONS, ".npy"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
    return name


def _npz_kind(item: Any) -> str:
    """``"npz"`` or ``"h5"`` for an item of the Synapse layout."""
    if isinstance(item, (str, os.PathLike)):
        name = os.fspath(item).lower()
        if name.endswith(".npz"):
            return "npz"
        if name.endswith(H5_EXTENSIONS):
            return "h5"
    raise ValueError(f"format='npz' items must be .npz slice or .h5 volume paths, got {item!r}")


# -- the dataset -------------------------------------------------------------------------------------------------------
class SegmentationDataset(Dataset):
    """Samples ``(image (3, h, w) float 0..255, label (h', w') int64)`` from a list of files; slices of ``.h5`` volumes
    are ``(image, label, volume_index, slice_index)`` (see the module doc).

    Args:
        items: ``(image path, mask path)`` pairs (``format="folder"``), or ``.npz`` slice paths or ``.h5`` volume
            paths (``format="npz"``; one kind per dataset).
        num_classes: ``K``; class ids must lie in ``[0, K)``.
        class_map: Pixel value -> class id (folder masks).
        image_size: Target size (see ``resize``); ``None`` keeps the files' size.
        resize: ``"square"``: image and mask to ``image_size x image_size``; ``"longest"``: the image's longer side
            to ``image_size``, the mask unchanged.
        augment: Random horizontal/vertical flips and 90-degree rotations (image and mask together; SAMed's random
            rotation and flip, on the right-angle grid). Draws from torch's global RNG, which
            ``SeededAugmentDataset`` seeds per sample.
        fmt: ``"folder"`` or ``"npz"``.
        keep_label_size: With ``resize="square"``, leave the label at the file's resolution (evaluation at the
            original resolution, as SAMed's test; the task resizes its logits to the label).

    Raises:
        ValueError: an unknown ``resize`` / ``fmt``, ``.npz`` and ``.h5`` items mixed, other items for ``"npz"``, or
            a malformed ``.h5`` volume (:func:`h5_volume_depth`; only shapes are read here).
    """

    def __init__(self, items: list, num_classes: int, class_map: Optional[Mapping[int, int]] = None,
                 image_size: Optional[int] = None, resize: str = "square", augment: bool = False,
                 fmt: str = "folder", keep_label_size: bool = False) -> None:
        if resize not in ("square", "longest"):
            raise ValueError(f"resize must be 'square' or 'longest', got {resize!r}")
        if fmt not in ("folder", "npz"):
            raise ValueError(f"fmt must be 'folder' or 'npz', got {fmt!r}")
        items = list(items)
        volumes: list[str] = []
        index: Optional[list[tuple[int, int]]] = None
        if fmt == "npz" and items:
            kinds = [_npz_kind(it) for it in items]
            if len(set(kinds)) > 1:
                raise ValueError(f"format='npz' items mix {kinds.count('npz')} .npz slices and {kinds.count('h5')} "
                                 ".h5 volumes: a dataset serves either slices or volumes")
            if kinds[0] == "h5":
                volumes = [os.fspath(it) for it in items]
                index = [(v, z) for v, path in enumerate(volumes) for z in range(h5_volume_depth(path))]
        self.items, self.num_classes, self.class_map = items, int(num_classes), class_map
        self.image_size, self.resize, self.augment, self.fmt = image_size, resize, augment, fmt
        self.keep_label_size = bool(keep_label_size)
        #: The ``.h5`` volume paths (``volume_index`` indexes this list); empty for slices and images.
        self.volumes = volumes
        self._index = index

    @property
    def volume_names(self) -> list[str]:
        """The volumes' case names (``case0001`` for ``case0001.npy.h5``), by ``volume_index``."""
        return [volume_name(p) for p in self.volumes]

    def __len__(self) -> int:
        return len(self._index) if self._index is not None else len(self.items)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample at its file resolution (no resizing or augmentation), sizes and class ids checked."""
        if self._index is not None:
            v, z = self._index[index]
            image, label = read_h5_slice(self.volumes[v], z)
            name = f"{self.volumes[v]!r} slice {z}"
        elif self.fmt == "npz":
            item = self.items[index]
            image, label = read_npz_slice(item)
            name = repr(item)
        else:
            image_path, mask_path = self.items[index]
            image, label = read_image(image_path), read_mask(mask_path, self.class_map, self.num_classes)
            name = f"{image_path!r} / {mask_path!r}"
            if self.class_map is not None and label.size and label.max() >= self.num_classes:
                raise ValueError(f"class_map maps {mask_path!r} to class ids >= num_classes={self.num_classes}")
        if self.fmt == "npz" and label.size and (label.max() >= self.num_classes or label.min() < 0):
            bad = np.unique(label[(label >= self.num_classes) | (label < 0)])
            raise ValueError(f"{name}: label holds class ids {bad[:8].tolist()} outside [0, {self.num_classes})")
        if tuple(image.shape[-2:]) != tuple(label.shape):
            raise ValueError(f"image and mask sizes differ for {name}: image {tuple(image.shape[-2:])}, mask "
                             f"{tuple(label.shape)} (height, width)")
        return image, torch.from_numpy(label)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
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
                if self.resize == "square" and not self.keep_label_size:
                    label = F.interpolate(label[None, None].float(), size, mode="nearest-exact")[0, 0].long()
        image, label = image.contiguous().clamp_(0, 255), label.contiguous()
        if self._index is None:
            return image, label
        v, z = self._index[index]
        return image, label, torch.tensor(v, dtype=torch.int64), torch.tensor(z, dtype=torch.int64)


def collate_segmentation(batch: list) -> tuple[torch.Tensor, ...]:
    """Stack ``(image, label)`` samples, or ``(image, label, volume_index, slice_index)`` samples of volumes (the
    indices become ``(B,)`` int64 tensors).

    Raises:
        ValueError: images/masks of different sizes (naming the fix), or samples of different lengths.
    """
    lengths = {len(b) for b in batch}
    if len(lengths) > 1 or not lengths <= {2, 4}:
        raise ValueError(f"a batch must hold (image, label) or (image, label, volume_index, slice_index) samples of "
                         f"one kind, got sample lengths {sorted(lengths)} (a dataset mixing slices and volumes?)")
    sizes = {(tuple(b[0].shape), tuple(b[1].shape)) for b in batch}
    if len(sizes) > 1:
        raise ValueError(f"a batch holds images/masks of different sizes {sorted(sizes)[:4]}: use resize='square', "
                         "resize the files to one size, or batch_size=1")
    return tuple(torch.stack([torch.as_tensor(b[i]) for b in batch]) for i in range(len(batch[0])))


def read_segmentation_splits(root: str, fmt: str = "folder", images_dir: str = "images",
                             masks_dir: str = "masks") -> dict[str, list]:
    """The files of each split present under ``root`` (``train`` is required).

    With ``fmt="npz"`` a split folder holds ``.npz`` slices or ``.h5`` volumes (sorted paths of one kind).

    Raises:
        ValueError: no ``root/train`` folder, an empty split folder, or (``npz``) one holding both ``.npz`` and
            ``.h5`` files.
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
            continue
        names = sorted(os.listdir(folder))
        slices = [os.path.join(folder, f) for f in names if f.lower().endswith(".npz")]
        volumes = [os.path.join(folder, f) for f in names if f.lower().endswith(H5_EXTENSIONS)]
        if slices and volumes:
            raise ValueError(f"{folder!r} holds both .npz slices ({len(slices)}) and .h5 volumes ({len(volumes)}): "
                             "a split is either slices or volumes (SAMed: train/ holds train_npz's slices, test/ "
                             "test_vol_h5's volumes); move one kind to another split folder")
        if not slices and not volumes:
            raise ValueError(f"no .npz slices or .h5 volumes in {folder!r}")
        out[split] = slices or volumes
    return out


def fewshot_items(items: list, shots: int, seed: int) -> list:
    """``shots`` labelled training items drawn with ``random.Random(seed)`` (sorted order kept); ``<= 0``: all.

    Items are what the split lists: image/mask pairs, ``.npz`` slices, or ``.h5`` volumes, so ``shots`` counts whole
    annotated volumes for a training split of volumes.

    Raises:
        ValueError: fewer items than ``shots``.
    """
    if shots <= 0:
        return list(items)
    if shots > len(items):
        raise ValueError(f"shots={shots} labelled items (images, slices or volumes) requested, but the training split "
                         f"has {len(items)}")
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


class SegmentationDataModule(SplitLoaders, LightningDataModule):
    """Image + mask folders (or Synapse ``.npz`` slices / ``.h5`` volumes), ``shots`` labelled training items,
    SAM-sized inputs.

    The training subset is drawn with ``seed`` and described by a manifest (:attr:`manifest_hash`) written during
    ``setup`` like :class:`~vpeft.datasets.datamodule.FewShotDataModule`'s (an existing manifest with another hash is
    an error). Shuffling and augmentation are seeded per ``(seed, epoch, index)`` with that module's sampler.

    Args:
        root: Dataset folder (see the module doc for the layout).
        num_classes: ``K`` including the background; default ``max(class_map values) + 1`` (required without
            ``class_map``).
        class_map: Pixel value -> class id for folder masks (e.g. ``{0: 0, 255: 1}``).
        format: ``"folder"`` or ``"npz"`` (``.npz`` slices or ``.h5`` volumes per split folder).
        shots: Labelled training items (``<= 0``: all): images, slices, or volumes for a training split of ``.h5``
            volumes.
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
        native_eval_labels: Validation and test labels at the files' resolution even with ``resize="square"`` (SAMed
            scores its predictions at the original 512 x 512; HD95 in voxels needs it). Batches then need files of
            one size (true of Synapse).
    """

    collate_fn = staticmethod(collate_segmentation)  # 4-tuples of volume slices too

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
            native_eval_labels: bool = False,
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
        self.native_eval_labels = bool(native_eval_labels)
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
                                   self.resize, augment, self.format,
                                   keep_label_size=self.native_eval_labels and split != "train")

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
