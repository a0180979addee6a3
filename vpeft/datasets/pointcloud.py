"""Point-cloud classification data: ModelNet40, ScanObjectNN, ModelNet few-shot, augmentations and a data module.

Layouts read (the files the Point-BERT / Point-MAE repositories point to):

* **ModelNet40, ``modelnet40_normal_resampled``** (``format="txt"``): ``root/modelnet40_shape_names.txt`` (one class
  per line), ``root/modelnet40_train.txt`` and ``root/modelnet40_test.txt`` (one shape id ``airplane_0001`` per
  line) and ``root/<class>/<shape id>.txt`` with one ``x,y,z,nx,ny,nz`` row per point (10,000 points). As the
  official loader: the first ``num_points`` rows, centred on their centroid and scaled into the unit sphere.
  ``modelnet10_*`` lists are read with ``num_categories=10``.
* **ModelNet40, packed arrays** (``format="npz"``): ``root/train.npz`` and ``root/test.npz`` with ``points``
  ``(M, P, 3 or 6)`` float and ``label`` ``(M,)`` int, plus ``root/shape_names.txt``. This is the pickle-free form of
  Point-MAE's ``modelnet40_{train,test}_{1024,8192}pts_fps.dat`` files; those are Python pickles and are never
  loaded (unpickling runs arbitrary code): :data:`DAT_CONVERSION` says how to convert them once, in a trusted session.
* **ModelNet40, HDF5** (``format="h5"``): ``root/ply_data_{train,test}*.h5`` with ``data`` ``(M, 2048, 3)``,
  ``label`` ``(M, 1)`` and optional ``normal``; class names from ``root/shape_names.txt``. Needs ``h5py``.
* **ScanObjectNN** (``h5``, needs ``h5py``): ``root/main_split/`` (OBJ-BG), ``root/main_split_nobg/`` (OBJ-ONLY),
  each with ``training_objectdataset.h5`` / ``test_objectdataset.h5``; PB-T50-RS is
  ``main_split/{training,test}_objectdataset_augmentedrot_scale75.h5``. Keys ``data`` ``(M, 2048, 3)`` and ``label``
  ``(M,)``; 15 classes; clouds are used as stored (all 2048 points, shuffled for training, as the official loader).
* **ModelNet few-shot** (``dataset="modelnet_fewshot"``): the Point-BERT protocol on ModelNet40: ``way`` classes
  drawn at random, ``shot`` training clouds of each from the training split and 20 test clouds of each from the test
  split, 10 folds. The official folds are pickles; here fold ``f`` is drawn with ``random.Random`` seeded from
  ``(seed, way, shot, f)`` and recorded in the manifest, so it is reproducible but not the official fold.

Augmentations (training; seeded per sample through :class:`~vpeft.datasets._loaders.SeededAugmentDataset`):
``scale_translate`` (Point-MAE's ``PointcloudScaleAndTranslate``: per-axis scale in ``[2/3, 3/2]``, per-axis shift in
``[-0.2, 0.2]``), ``rotate`` (random rotation about the up axis ``y``), ``dropout`` (PointNet++'s random point
dropout: up to 87.5% of the points replaced by the first point). Point-MAE's fine-tuning uses ``scale_translate``.

Checkpoint selection uses a validation split carved from the training split (stratified, ``val_fraction``), never the
test split (the official scripts select on test; their numbers are therefore optimistic). In the few-shot setting
the validation clouds come out of the ``shot`` training clouds of each class (``shot=10, val_fraction=0.1``: 9 train,
1 validation per class); ``val_fraction=0`` trains on all ``shot`` clouds, as the official protocol, without
validation.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import random
from collections.abc import Sequence
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ._loaders import SplitLoaders, record_manifest
from .base import DatasetSplits, Datum

logger = logging.getLogger(__name__)

__all__ = ["AUGMENTATIONS", "DAT_CONVERSION", "PointCloudDataModule", "PointCloudDataset", "PointCloudSet",
           "SCANOBJECTNN_VARIANTS", "check_cloud", "fewshot_fold", "pc_normalize", "point_dropout", "read_modelnet",
           "read_scanobjectnn", "rotate", "scale_translate", "stratified_val_split"]

DAT_CONVERSION = (
    "Point-MAE's .dat files are Python pickles; vpeft never unpickles data files. Convert them once, in a session "
    "you trust: `import pickle, numpy as np; pts, lab = pickle.load(open(F, 'rb')); np.savez(OUT, "
    "points=np.stack(pts).astype('float32'), label=np.concatenate(lab).astype('int64'))` with OUT = "
    "root/train.npz or root/test.npz, and write the 40 class names to root/shape_names.txt; then use format='npz' "
    "(or the original modelnet40_normal_resampled txt files with format='txt').")

#: ScanObjectNN variant -> (sub-folder, training file, test file).
SCANOBJECTNN_VARIANTS: dict[str, tuple[str, str, str]] = {
    "obj_bg": ("main_split", "training_objectdataset.h5", "test_objectdataset.h5"),
    "obj_only": ("main_split_nobg", "training_objectdataset.h5", "test_objectdataset.h5"),
    "pb_t50_rs": ("main_split", "training_objectdataset_augmentedrot_scale75.h5",
                  "test_objectdataset_augmentedrot_scale75.h5"),
}
SCANOBJECTNN_CLASSES = ["bag", "bin", "box", "cabinet", "chair", "desk", "display", "door", "shelf", "table", "bed",
                        "pillow", "sink", "sofa", "toilet"]
#: Test clouds per class in the few-shot protocol (Point-BERT / Point-MAE).
FEWSHOT_TEST_PER_CLASS = 20


# -- checks and geometry -----------------------------------------------------------------------------------------------
def check_cloud(points: np.ndarray, name: str, num_points: Optional[int] = None, use_normals: bool = False
                ) -> np.ndarray:
    """Validate one cloud ``(P, C)`` and return it as float32.

    Raises:
        ValueError: not 2-D, fewer than 3 (6 with normals) columns, NaN or infinite values, or fewer than
            ``num_points`` points.
    """
    arr = np.asarray(points)
    need = 6 if use_normals else 3
    if arr.ndim != 2 or arr.shape[1] < need:
        raise ValueError(f"{name}: expected a (points, {need}{'+' if need == 3 else ''}) array "
                         f"({'x,y,z,nx,ny,nz' if use_normals else 'x,y,z[,...]'}), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name}: point coordinates must be numeric, got dtype {arr.dtype}")
    if not np.isfinite(arr[:, :need]).all():
        raise ValueError(f"{name}: the cloud holds NaN or infinite coordinates")
    if num_points is not None and arr.shape[0] < num_points:
        raise ValueError(f"{name}: {arr.shape[0]} points, fewer than the {num_points} requested (num_points)")
    return arr[:, :need].astype(np.float32, copy=False)


def pc_normalize(xyz: np.ndarray) -> np.ndarray:
    """Centre on the centroid and scale into the unit sphere (the official ModelNet loader's ``pc_normalize``)."""
    xyz = xyz - xyz.mean(axis=0)
    radius = float(np.sqrt((xyz ** 2).sum(axis=1)).max())
    return xyz / radius if radius > 0 else xyz


# -- augmentations (torch; seeded by the caller's generator) -----------------------------------------------------------
def scale_translate(points: torch.Tensor, scale_low: float = 2.0 / 3.0, scale_high: float = 1.5,
                    translate_range: float = 0.2, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Point-MAE's ``PointcloudScaleAndTranslate``: ``xyz * s + t`` per cloud, ``s`` uniform per axis in
    ``[scale_low, scale_high]``, ``t`` uniform per axis in ``[-translate_range, translate_range]``.

    Args:
        points: ``(N, C)`` or ``(B, N, C)``; only the first 3 columns (xyz) change, normals are kept.
        generator: Torch generator (default: the global one).
    """
    batch = points if points.dim() == 3 else points[None]
    b = batch.shape[0]
    kw = dict(generator=generator, device="cpu", dtype=torch.float32)
    s = (torch.rand(b, 1, 3, **kw) * (scale_high - scale_low) + scale_low).to(batch)
    t = ((torch.rand(b, 1, 3, **kw) * 2 - 1) * translate_range).to(batch)
    out = batch.clone()
    out[..., :3] = batch[..., :3] * s + t
    return out if points.dim() == 3 else out[0]


def rotate(points: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random rotation about the up axis ``y`` (ModelNet's up axis); normals rotate with the points."""
    angle = float(torch.rand((), generator=generator)) * 2 * math.pi
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=points.dtype)
    out = points.clone()
    out[..., :3] = points[..., :3] @ rot.T
    if points.shape[-1] >= 6:
        out[..., 3:6] = points[..., 3:6] @ rot.T
    return out


def point_dropout(points: torch.Tensor, max_ratio: float = 0.875, generator: Optional[torch.Generator] = None
                  ) -> torch.Tensor:
    """PointNet++'s random input dropout: a ratio ``r`` uniform in ``[0, max_ratio]``, each point dropped with
    probability ``r`` and replaced by the first point (the cloud keeps its size)."""
    ratio = float(torch.rand((), generator=generator)) * max_ratio
    drop = torch.rand(points.shape[0], generator=generator) <= ratio
    out = points.clone()
    if drop.any():
        out[drop] = points[0]
    return out


AUGMENTATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "scale_translate": scale_translate, "rotate": rotate, "dropout": point_dropout}


# -- readers -----------------------------------------------------------------------------------------------------------
class PointCloudSet:
    """The clouds of one split: ``ids``, ``labels``, ``classnames`` and :meth:`load` (raw ``(P, C)`` array).

    Per-file clouds (txt) are read on demand; packed files (npz, h5) are read once into memory.
    """

    def __init__(self, ids: list[str], labels: Sequence[int], classnames: list[str],
                 loader: Callable[[int], np.ndarray], normalize: bool = False) -> None:
        self.ids, self.labels, self.classnames = list(ids), [int(v) for v in labels], list(classnames)
        if len(self.ids) != len(self.labels):
            raise ValueError(f"{len(self.ids)} clouds but {len(self.labels)} labels")
        bad = [v for v in self.labels if not 0 <= v < len(self.classnames)]
        if bad:
            raise ValueError(f"labels {sorted(set(bad))[:5]} outside [0, {len(self.classnames)}) (the class names)")
        self._loader, self.normalize = loader, normalize

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> np.ndarray:
        """The raw cloud ``index`` (all stored points and columns)."""
        return self._loader(index)


def _read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise ValueError(f"missing list file {path!r}")
    with open(path, encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip()]


def _refuse_pickles(root: str) -> None:
    dats = sorted(glob.glob(os.path.join(root, "*.dat")) + glob.glob(os.path.join(root, "*.pkl")))
    if dats:
        raise ValueError(f"{root!r} holds pickle files ({os.path.basename(dats[0])}, ...) and no readable layout. "
                         + DAT_CONVERSION)


def _require_h5py(what: str):
    try:
        import h5py
    except ImportError as e:
        raise ImportError(f"{what} is stored as HDF5 and needs h5py, which is not installed: `pip install h5py` "
                          "(or convert the files to the npz layout: see vpeft.datasets.pointcloud)") from e
    return h5py


def _h5_arrays(path: str, data_key: str = "data", label_key: str = "label", normal_key: Optional[str] = None
               ) -> tuple[np.ndarray, np.ndarray]:
    h5py = _require_h5py(os.path.basename(path))
    with h5py.File(path, "r") as f:
        for k in (data_key, label_key):
            if k not in f:
                raise ValueError(f"{path}: no '{k}' dataset (keys: {sorted(f.keys())})")
        data = np.asarray(f[data_key])
        if normal_key is not None and normal_key in f:
            data = np.concatenate([data, np.asarray(f[normal_key])], axis=-1)
        label = np.asarray(f[label_key])
    return data, label


def _packed(name: str, points: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if points.ndim != 3 or points.shape[-1] < 3:
        raise ValueError(f"{name}: points must be (clouds, points, 3 or 6), got shape {points.shape}")
    if labels.ndim != 1 or labels.shape[0] != points.shape[0]:
        raise ValueError(f"{name}: labels must be ({points.shape[0]},) for {points.shape[0]} clouds, got shape "
                         f"{labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise ValueError(f"{name}: labels must be integers, got dtype {labels.dtype}")
        labels = labels.astype(np.int64)
    return points, labels


def _packed_set(name: str, points: np.ndarray, labels: np.ndarray, classnames: list[str], prefix: str,
                normalize: bool) -> PointCloudSet:
    points, labels = _packed(name, points, labels)
    return PointCloudSet([f"{prefix}#{i}" for i in range(len(labels))], labels.tolist(), classnames,
                         lambda i: points[i], normalize)


def modelnet_layout(root: str, num_categories: int = 40) -> str:
    """The ModelNet layout found under ``root``: ``"txt"``, ``"npz"`` or ``"h5"``.

    Raises:
        ValueError: none found (pickled ``.dat`` files are named with the conversion recipe).
    """
    if not os.path.isdir(root):
        raise ValueError(f"ModelNet root {root!r} is not a folder")
    if os.path.isfile(os.path.join(root, f"modelnet{num_categories}_shape_names.txt")):
        return "txt"
    if os.path.isfile(os.path.join(root, "train.npz")):
        return "npz"
    if glob.glob(os.path.join(root, "ply_data_train*.h5")):
        return "h5"
    _refuse_pickles(root)
    raise ValueError(f"{root!r} holds no ModelNet layout: expected modelnet{num_categories}_shape_names.txt + "
                     f"modelnet{num_categories}_{{train,test}}.txt (modelnet40_normal_resampled), train.npz/test.npz "
                     "+ shape_names.txt, or ply_data_{train,test}*.h5 + shape_names.txt")


def read_modelnet(root: str, split: str, num_categories: int = 40, format: Optional[str] = None,  # noqa: A002
                  use_normals: bool = False) -> PointCloudSet:
    """ModelNet40 (or 10) clouds of ``split`` (``"train"`` / ``"test"``) in any layout of the module doc.

    Args:
        root: Dataset folder.
        split: ``"train"`` or ``"test"``.
        num_categories: 40 or 10 (txt layout's list names).
        format: ``"txt"``, ``"npz"``, ``"h5"`` or ``None`` (detect).
        use_normals: Keep the normal columns (the txt layout always has them; h5 only with a ``normal`` key).

    Raises:
        ValueError: a missing or malformed file, an unknown class or shape id.
        ImportError: the h5 layout without h5py.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    fmt = format or modelnet_layout(root, num_categories)
    if fmt == "txt":
        classnames = _read_lines(os.path.join(root, f"modelnet{num_categories}_shape_names.txt"))
        index = {c: i for i, c in enumerate(classnames)}
        ids, labels = [], []
        for sid in _read_lines(os.path.join(root, f"modelnet{num_categories}_{split}.txt")):
            cls = sid.rsplit("_", 1)[0]
            if cls not in index:
                raise ValueError(f"shape id {sid!r} in modelnet{num_categories}_{split}.txt names no class of "
                                 f"modelnet{num_categories}_shape_names.txt")
            ids.append(f"{cls}/{sid}.txt")
            labels.append(index[cls])

        def load_txt(i: int) -> np.ndarray:
            path = os.path.join(root, ids[i])
            if not os.path.isfile(path):
                raise ValueError(f"missing point file {path!r}")
            try:
                return np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
            except ValueError as e:
                raise ValueError(f"{path}: not a comma-separated x,y,z[,nx,ny,nz] table ({e})") from e

        return PointCloudSet(ids, labels, classnames, load_txt, normalize=True)
    if fmt in ("npz", "h5"):
        classnames = _read_lines(os.path.join(root, "shape_names.txt"))
        if fmt == "npz":
            path = os.path.join(root, f"{split}.npz")
            if not os.path.isfile(path):
                _refuse_pickles(root)
                raise ValueError(f"missing {path!r} (npz layout: train.npz / test.npz with 'points' and 'label')")
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in ("points", "label") if k not in z.files]
                if missing:
                    raise ValueError(f"{path}: no {missing} arrays (has {z.files})")
                points, labels = z["points"], z["label"]
            return _packed_set(path, points, labels, classnames, f"{split}.npz", normalize=True)
        files = sorted(glob.glob(os.path.join(root, f"ply_data_{split}*.h5")),
                       key=lambda p: (len(p), p))  # ply_data_train2 before ply_data_train10
        if not files:
            raise ValueError(f"no ply_data_{split}*.h5 files in {root!r}")
        parts = [_h5_arrays(p, normal_key="normal" if use_normals else None) for p in files]
        for p, (d, lab) in zip(files, parts):
            _packed(p, d, lab)
        ids = [f"{os.path.basename(p)}#{i}" for p, (d, _) in zip(files, parts) for i in range(len(d))]
        points = np.concatenate([d for d, _ in parts])
        labels = np.concatenate([_packed(p, d, lab)[1] for p, (d, lab) in zip(files, parts)])
        return PointCloudSet(ids, labels.tolist(), classnames, lambda i: points[i], normalize=True)
    raise ValueError(f"format must be 'txt', 'npz', 'h5' or None, got {fmt!r}")


def read_scanobjectnn(root: str, split: str, variant: str = "pb_t50_rs") -> PointCloudSet:
    """ScanObjectNN clouds of ``split`` for ``variant`` (``obj_bg``, ``obj_only``, ``pb_t50_rs``).

    ``root`` is the ``h5_files`` folder (holding ``main_split/`` and ``main_split_nobg/``). Needs h5py.
    """
    if variant not in SCANOBJECTNN_VARIANTS:
        raise ValueError(f"ScanObjectNN variant must be one of {sorted(SCANOBJECTNN_VARIANTS)}, got {variant!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder, train_file, test_file = SCANOBJECTNN_VARIANTS[variant]
    path = os.path.join(root, folder, train_file if split == "train" else test_file)
    if not os.path.isfile(path):
        raise ValueError(f"ScanObjectNN {variant}: missing {path!r} (root is the h5_files folder)")
    points, labels = _packed(path, *_h5_arrays(path))
    return _packed_set(path, points, labels, SCANOBJECTNN_CLASSES, f"{folder}/{os.path.basename(path)}",
                       normalize=False)


# -- few-shot folds and validation split -------------------------------------------------------------------------------
def fewshot_fold(train_labels: Sequence[int], test_labels: Sequence[int], way: int, shot: int, fold: int,
                 seed: int = 0, test_per_class: int = FEWSHOT_TEST_PER_CLASS) -> dict[str, list[int]]:
    """One N-way K-shot fold (Point-BERT's protocol): ``way`` classes, ``shot`` training and ``test_per_class`` test
    clouds of each, drawn with ``random.Random`` seeded from ``(seed, way, shot, fold)``.

    Returns:
        ``{"classes": [...original class ids, new label order], "train": [indices], "test": [indices]}``; the new
        label of a cloud is the position of its class in ``classes``.

    Raises:
        ValueError: bad ``way``/``shot``/``fold`` or a class with too few clouds.
    """
    from ._loaders import mix_seed

    for name, v in (("way", way), ("shot", shot), ("test_per_class", test_per_class)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(fold, bool) or not isinstance(fold, int) or fold < 0:
        raise ValueError(f"fold must be an int >= 0 (the protocol has 10: 0..9), got {fold!r}")
    classes = sorted(set(int(v) for v in train_labels))
    if way > len(classes):
        raise ValueError(f"way={way} but the training split has {len(classes)} classes")
    rng = random.Random(mix_seed(seed, way, shot, fold))
    chosen = rng.sample(classes, way)
    train, test = [], []
    for c in chosen:
        tr = [i for i, v in enumerate(train_labels) if v == c]
        te = [i for i, v in enumerate(test_labels) if v == c]
        if len(tr) < shot or len(te) < test_per_class:
            raise ValueError(f"class {c} has {len(tr)} training / {len(te)} test clouds; the fold needs {shot} / "
                             f"{test_per_class}")
        train += sorted(rng.sample(tr, shot))
        test += sorted(rng.sample(te, test_per_class))
    return {"classes": chosen, "train": train, "test": test}


def stratified_val_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split training indices into ``(train, val)``: ``round(fraction * n_c)`` clouds of each class (at least one
    when ``fraction > 0`` and the class has two or more) go to validation, drawn with ``random.Random(seed)``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction!r}")
    rng = random.Random(seed)
    train, val = [], []
    for c in sorted(set(labels)):
        idx = [i for i, v in enumerate(labels) if v == c]
        n = int(round(fraction * len(idx)))
        if fraction > 0 and len(idx) > 1:
            n = min(max(n, 1), len(idx) - 1)
        picked = set(rng.sample(idx, n)) if n else set()
        val += [i for i in idx if i in picked]
        train += [i for i in idx if i not in picked]
    return sorted(train), sorted(val)


# -- dataset -----------------------------------------------------------------------------------------------------------
class PointCloudDataset(Dataset):
    """``(points (num_points, 3 or 6) float32, label)`` samples of a :class:`PointCloudSet` subset.

    Args:
        source: The split's clouds.
        indices: Indices into ``source`` (default all).
        num_points: Points per sample. Evaluation (and training without ``resample``) takes the first
            ``num_points`` stored points (the official ModelNet loader); training with ``resample`` takes a random
            subset (ScanObjectNN's official loader shuffles all 2048).
        use_normals: Keep ``nx, ny, nz`` columns.
        augment: Names from :data:`AUGMENTATIONS`, applied in order (training).
        label_map: Original label -> served label (few-shot folds); default identity.
        resample: Random point subset per sample (training).
    """

    def __init__(self, source: PointCloudSet, indices: Optional[Sequence[int]] = None, num_points: int = 1024,
                 use_normals: bool = False, augment: Sequence[str] = (), label_map: Optional[dict[int, int]] = None,
                 resample: bool = False) -> None:
        bad = [a for a in augment if a not in AUGMENTATIONS]
        if bad:
            raise ValueError(f"unknown augmentations {bad}; known: {sorted(AUGMENTATIONS)}")
        self.source = source
        self.indices = list(range(len(source))) if indices is None else list(indices)
        self.num_points, self.use_normals = num_points, use_normals
        self.augment, self.label_map, self.resample = list(augment), label_map, resample

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = self.indices[i]
        name = f"cloud {self.source.ids[j]!r}"
        pts = check_cloud(self.source.load(j), name, self.num_points, self.use_normals)
        if self.resample:
            pts = pts[torch.randperm(pts.shape[0])[: self.num_points].numpy()]
        else:
            pts = pts[: self.num_points]
        pts = pts.copy()
        if self.source.normalize:
            pts[:, :3] = pc_normalize(pts[:, :3])
        x = torch.from_numpy(pts)
        for a in self.augment:
            x = AUGMENTATIONS[a](x)
        label = self.source.labels[j]
        return x, int(self.label_map[label] if self.label_map is not None else label)


# -- the data module ---------------------------------------------------------------------------------------------------
try:
    from lightning.pytorch import LightningDataModule
except ImportError:  # pragma: no cover - Lightning is optional for the readers
    LightningDataModule = object  # type: ignore[assignment,misc]

DATASETS = ("modelnet40", "modelnet10", "scanobjectnn", "modelnet_fewshot")


class PointCloudDataModule(SplitLoaders, LightningDataModule):
    """Point-cloud classification data with a seeded validation split carved from training (never from test).

    The sampled subsets (training, validation; few-shot: the fold) are described by a manifest written during
    ``setup`` (an existing manifest with another hash is an error). Shuffling and augmentation are seeded per
    ``(seed, epoch, index)`` as in :class:`~vpeft.datasets.datamodule.FewShotDataModule`.

    Args:
        dataset: ``"modelnet40"``, ``"modelnet10"``, ``"scanobjectnn"`` or ``"modelnet_fewshot"``.
        root: Dataset folder (ScanObjectNN: the ``h5_files`` folder).
        format: ModelNet layout (``"txt"``, ``"npz"``, ``"h5"``; default detected).
        variant: ScanObjectNN variant (``"obj_bg"``, ``"obj_only"``, ``"pb_t50_rs"``).
        num_points: Points per cloud (official: 1024 ModelNet, 2048 ScanObjectNN).
        use_normals: Serve ``(N, 6)`` clouds with normals (the Point-MAE backbone reads only xyz).
        way: Few-shot classes (5 or 10).
        shot: Few-shot training clouds per class (10 or 20).
        fold: Few-shot fold (0..9).
        val_fraction: Fraction of each training class held out for checkpoint selection (0: no validation).
        seed: Validation split, few-shot fold, shuffle and augmentation seed.
        augment: Training augmentations (names of :data:`AUGMENTATIONS`), default Point-MAE's ``scale_translate``.
        batch_size: Training batch size (official 32).
        eval_batch_size: Validation / test batch size (default ``batch_size``).
        num_workers: Data-loader workers.
        backbone: Linked by the CLI (unused).
        backbone_kwargs: Linked by the CLI (unused).
        manifest_dir: Manifest folder; default ``<trainer.default_root_dir>/manifests``.
    """

    def __init__(
            self,
            dataset: str = "modelnet40",
            root: str = "data/modelnet40_normal_resampled",
            format: Optional[str] = None,  # noqa: A002  (the config key users write)
            variant: str = "pb_t50_rs",
            num_points: int = 1024,
            use_normals: bool = False,
            way: int = 5,
            shot: int = 10,
            fold: int = 0,
            val_fraction: float = 0.1,
            seed: int = 1,
            augment: Sequence[str] = ("scale_translate",),
            batch_size: int = 32,
            eval_batch_size: Optional[int] = None,
            num_workers: int = 0,
            backbone: Optional[str] = None,
            backbone_kwargs: Optional[dict[str, Any]] = None,
            manifest_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
            raise ValueError(f"num_points must be a positive int, got {num_points!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        bad = [a for a in augment if a not in AUGMENTATIONS]
        if bad:
            raise ValueError(f"unknown augmentations {bad}; known: {sorted(AUGMENTATIONS)}")
        if dataset == "scanobjectnn" and variant not in SCANOBJECTNN_VARIANTS:
            raise ValueError(f"variant must be one of {sorted(SCANOBJECTNN_VARIANTS)}, got {variant!r}")
        self.save_hyperparameters()
        self.dataset, self.root, self.format, self.variant = dataset, root, format, variant
        self.num_points, self.use_normals = num_points, use_normals
        self.way, self.shot, self.fold = way, shot, fold
        self.val_fraction, self.seed, self.augment = val_fraction, seed, list(augment)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.manifest_dir = num_workers, manifest_dir
        self.backbone, self.backbone_kwargs = backbone, dict(backbone_kwargs or {})
        self._sources: dict[str, PointCloudSet] = {}
        self._plan: Optional[dict[str, Any]] = None
        self._manifest: Optional[dict] = None
        self.manifest_path: Optional[str] = None
        self.train_set = self.val_set = self.test_set = None

    # -- reading and sampling ------------------------------------------------------------------------------------------
    def source(self, split: str) -> PointCloudSet:
        """The full ``train`` or ``test`` split."""
        if split not in self._sources:
            if self.dataset == "scanobjectnn":
                self._sources[split] = read_scanobjectnn(self.root, split, self.variant)
            else:
                cats = 10 if self.dataset == "modelnet10" else 40
                self._sources[split] = read_modelnet(self.root, split, cats, self.format, self.use_normals)
        return self._sources[split]

    @property
    def plan(self) -> dict[str, Any]:
        """Indices of the train / val / test subsets and the label map (few-shot)."""
        if self._plan is None:
            train_src = self.source("train")
            label_map = None
            if self.dataset == "modelnet_fewshot":
                fold = fewshot_fold(train_src.labels, self.source("test").labels, self.way, self.shot, self.fold,
                                    self.seed)
                label_map = {c: i for i, c in enumerate(fold["classes"])}
                pool, test = fold["train"], fold["test"]
            else:
                pool, test = list(range(len(train_src))), None
            tr, va = stratified_val_split([train_src.labels[i] for i in pool], self.val_fraction, self.seed)
            self._plan = {"train": [pool[i] for i in tr], "val": [pool[i] for i in va], "test": test,
                          "label_map": label_map}
        return self._plan

    @property
    def classnames(self) -> list[str]:
        """Class names in served-label order."""
        names = self.source("train").classnames
        lm = self.plan["label_map"]
        return [names[c] for c in sorted(lm, key=lm.get)] if lm is not None else list(names)

    @property
    def num_classes(self) -> int:
        """Served classes (few-shot: ``way``); the CLI links it to ``model.num_classes``."""
        if self.dataset == "modelnet_fewshot":
            return int(self.way)
        if self.dataset == "scanobjectnn":
            return len(SCANOBJECTNN_CLASSES)  # fixed: no need to open the files to parse a config
        return len(self.source("train").classnames)

    @property
    def manifest(self) -> dict:
        """The split manifest (ids + hash) of the sampled subsets."""
        if self._manifest is None:
            from .fewshot import build_manifest

            src, plan, names = self.source("train"), self.plan, self.classnames
            lm = plan["label_map"] or {}

            def data(idx: list[int], s: PointCloudSet) -> list[Datum]:
                out = []
                for i in idx:
                    lab = lm.get(s.labels[i], s.labels[i])
                    out.append(Datum(s.ids[i], int(lab), names[lab]))
                return out

            test = data(plan["test"], self.source("test")) if plan["test"] is not None else []
            ds = DatasetSplits(self._name(), data(plan["train"], src), data(plan["val"], src), test, names, None)
            self._manifest = build_manifest(ds, num_points=self.num_points, val_fraction=self.val_fraction,
                                            seed=self.seed, way=self.way, shot=self.shot, fold=self.fold,
                                            test_ids=[d.impath for d in test])
        return self._manifest

    @property
    def manifest_hash(self) -> str:
        """SHA-256 of the sampled subsets."""
        return self.manifest["hash"]

    def _name(self) -> str:
        if self.dataset == "scanobjectnn":
            return f"scanobjectnn_{self.variant}"
        if self.dataset == "modelnet_fewshot":
            return f"modelnet_fewshot_{self.way}way{self.shot}shot_fold{self.fold}"
        return self.dataset

    def _dataset(self, split: str, train: bool) -> PointCloudDataset:
        src = self.source("test" if split == "test" else "train")
        idx = self.plan[split]
        return PointCloudDataset(src, idx, self.num_points, self.use_normals, self.augment if train else (),
                                 self.plan["label_map"], resample=train and self.dataset == "scanobjectnn")

    def setup(self, stage: str) -> None:
        """Build the stage's datasets; on global rank 0 write (or check) the manifest."""
        if stage == "fit":
            self.train_set = self._dataset("train", True)
        if stage in ("fit", "validate"):
            self.val_set = self._dataset("val", False)
            if not len(self.val_set):
                logger.warning("val_fraction=0: no validation split; checkpoint selection cannot use validation data")
        if stage == "test":
            self.test_set = self._dataset("test", False)
        self._write_manifest()

    def _write_manifest(self) -> None:
        name = f"pointcloud_{self._name()}_val{self.val_fraction}_seed{self.seed}.json"
        self.manifest_path = record_manifest(self.manifest, self.manifest_hash, self.manifest_dir, self.trainer, name,
                                             f"the sampled subsets of {self.root!r}")
