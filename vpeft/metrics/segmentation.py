"""Medical segmentation metrics: HD95, per-case Dice / HD95 with the TransUNet / SAMed convention, per-volume scores.

The Synapse multi-organ protocol of TransUNet and SAMed (hitachinsk/SAMed ``utils.py``, ``test_single_volume`` and
``calculate_metric_percase``) scores every test CT volume in 3-D: the slices' predictions are stacked into a volume,
and each foreground class ``c`` is scored on the binary volumes ``pred == c`` and ``gt == c`` with medpy's ``dc``
(Dice) and ``hd95``. The reported numbers are the per-class means over the volumes and their mean over the classes.
SAMed passes no voxel spacing, so its HD95 is in voxels.

HD95 (:func:`hd95`), medpy's definition re-implemented on ``scipy.ndimage``:
    * ``surface(X) = X xor erosion(X)`` with the face-connected structuring element
      (``generate_binary_structure(ndim, 1)``); the erosion pads with background, so foreground voxels on the array's
      border are surface voxels.
    * ``d(A -> B)``: for every surface voxel of ``A``, the Euclidean distance (in ``spacing`` units) to the nearest
      surface voxel of ``B``, read from the exact Euclidean distance transform of ``~surface(B)``.
    * ``combine="pooled"`` (the default; medpy's ``hd95``, hence the published SAMed / TransUNet numbers): the 95th
      percentile of ``d(A -> B)`` and ``d(B -> A)`` concatenated. ``combine="max"`` (MONAI's
      ``compute_hausdorff_distance(percentile=95)``): ``max(P95(d(A -> B)), P95(d(B -> A)))``. Percentiles use
      numpy's default (linear) interpolation.
    * Either mask empty: ``NaN`` (medpy raises); callers choose a convention (:func:`case_scores`).
    * Both masks are cropped to the bounding box of their union first. That is exact (every surface voxel and every
      nearest partner lies inside it, and voxels outside it are background in both masks) and makes organ-sized
      masks in a 512 x 512 x 150 CT volume cheap.

Per-case conventions (:func:`case_scores`), for each foreground class:

=====================  ===============================  ==========================================
 pred / gt non-empty    ``"transunet"`` (SAMed)          ``"nan"``
=====================  ===============================  ==========================================
 both                   (Dice, HD95)                     (Dice, HD95)
 pred only              (1, 0)                           (0, NaN)
 gt only                (0, 0)                           (0, NaN)
 neither                (0, 0)                           (NaN, NaN)
=====================  ===============================  ==========================================

The TransUNet convention scores a predicted organ that the volume does not contain as perfect (Dice 1, HD95 0) and a
missed organ as HD95 0; it is what the published Synapse tables use. ``"nan"`` keeps Dice where it is defined (one
empty mask: 0, both empty: 0/0) and HD95 only where both masks exist; means then skip the NaNs.

:class:`HausdorffDistance95` is a torchmetrics ``Metric`` for validation loops on 2-D (or 3-D) batches;
:class:`VolumeAccumulator` reassembles per-slice predictions into volumes and scores them with :func:`case_scores`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch

try:
    from torchmetrics import Metric
except ImportError:  # pragma: no cover - torchmetrics comes with the lightning extra
    Metric = object  # type: ignore[assignment,misc]

ArrayLike = Union[np.ndarray, torch.Tensor]
Spacing = Optional[Union[float, Sequence[float]]]

COMBINE = ("pooled", "max")
CONVENTIONS = ("transunet", "nan")


# -- helpers -----------------------------------------------------------------------------------------------------------
def _ndimage():
    try:
        from scipy import ndimage
    except ImportError as e:  # pragma: no cover - scipy is in the sam and dev extras
        raise ImportError("HD95 needs scipy (exact Euclidean distance transform): `pip install scipy` or "
                          "`pip install vpeft[sam]`") from e
    return ndimage


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")


def _binary_pair(a: ArrayLike, b: ArrayLike, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Two masks as bool arrays of one shape (non-zero is foreground, as in medpy)."""
    a, b = _to_numpy(a, names[0]), _to_numpy(b, names[1])
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim == 0:
        raise ValueError(f"{names[0]} and {names[1]} must have at least one dimension, got scalars")
    return a.astype(bool, copy=False), b.astype(bool, copy=False)


def _class_ids(x: ArrayLike, name: str) -> np.ndarray:
    """An integer class-id array (bool, integer, or integer-valued float such as SAMed's float32 labels)."""
    arr = _to_numpy(x, name)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"{name} must hold integer class ids, got non-integer values such as "
                             f"{arr[arr != np.round(arr)][:4].tolist()}")
        return arr.astype(np.int64)
    raise TypeError(f"{name} must hold integer class ids, got dtype {arr.dtype}")


def _label_pair(pred: ArrayLike, gt: ArrayLike, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    p, g = _class_ids(pred, "pred"), _class_ids(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same shape, got {p.shape} and {g.shape}")
    if p.ndim == 0:
        raise ValueError("pred and gt must have at least one dimension, got scalars")
    for name, arr in (("pred", p), ("gt", g)):
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= num_classes):
            bad = np.unique(arr[(arr < 0) | (arr >= num_classes)])
            raise ValueError(f"{name} holds class ids {bad[:8].tolist()} outside [0, {num_classes})")
    return p, g


def _check_num_classes(num_classes: Any) -> int:
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (classes including the background), got {num_classes!r}")
    return int(num_classes)


def _check_options(percentile: Any, combine: Any, connectivity: Any = 1) -> None:
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be a number in [0, 100], got {percentile!r}")
    if isinstance(connectivity, bool) or not isinstance(connectivity, int) or connectivity < 1:
        raise ValueError(f"connectivity must be an int >= 1 (1: face neighbours), got {connectivity!r}")


def _normalize_spacing(spacing: Any, ndim: int) -> Optional[tuple[float, ...]]:
    """``None``, a number (every axis) or one positive finite number per axis."""
    if spacing is None:
        return None
    if isinstance(spacing, torch.Tensor):
        spacing = spacing.tolist()
    try:
        values = (float(spacing),) * ndim if np.ndim(spacing) == 0 else tuple(float(s) for s in spacing)
    except (TypeError, ValueError) as e:
        raise ValueError(f"spacing must be a positive number or one per axis, got {spacing!r}") from e
    if len(values) != ndim:
        raise ValueError(f"spacing has {len(values)} values for {ndim}-D masks (one per axis, in array order)")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing values must be positive and finite, got {values}")
    return values


def _bbox(mask: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of a non-empty mask."""
    out = []
    for axis in range(mask.ndim):
        other = tuple(i for i in range(mask.ndim) if i != axis)
        hit = np.flatnonzero(mask.any(axis=other) if other else mask)
        out.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(out)


def _union_box(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def _surface(mask: np.ndarray, connectivity: int) -> np.ndarray:
    nd = _ndimage()
    structure = nd.generate_binary_structure(mask.ndim, min(connectivity, mask.ndim))
    # border_value=0: outside the array is background, so foreground voxels on the border are surface voxels (medpy).
    return mask ^ nd.binary_erosion(mask, structure=structure, iterations=1, border_value=0)


def _directed(src_surface: np.ndarray, dst_surface: np.ndarray, spacing: Optional[tuple[float, ...]]) -> np.ndarray:
    """``d(src -> dst)`` at the surface voxels of ``src`` (C order); ``dst_surface`` must be non-empty."""
    # The transform gives every non-zero voxel its distance to the nearest zero: the zeros are dst's surface voxels.
    edt = _ndimage().distance_transform_edt(~dst_surface, sampling=spacing)
    return edt[src_surface]


# -- binary metrics ----------------------------------------------------------------------------------------------------
def surface_mask(mask: ArrayLike, connectivity: int = 1) -> np.ndarray:
    """The surface voxels of a binary mask: ``mask xor erosion(mask)`` (medpy's object border).

    Args:
        mask: A binary mask of any dimension (non-zero is foreground).
        connectivity: ``scipy.ndimage.generate_binary_structure`` connectivity of the erosion (1: face neighbours,
            medpy's and SAMed's default).

    Returns:
        A bool array of the mask's shape.
    """
    m, _ = _binary_pair(mask, mask, ("mask", "mask"))
    _check_options(95.0, "pooled", connectivity)
    return _surface(m, connectivity)


def surface_distances(a: ArrayLike, b: ArrayLike, spacing: Spacing = None, connectivity: int = 1) -> np.ndarray:
    """The directed surface distances ``d(a -> b)``: for each surface voxel of ``a`` (C order), the Euclidean distance
    to the nearest surface voxel of ``b``.

    Args:
        a: Binary mask (non-zero is foreground).
        b: Binary mask of the same shape.
        spacing: Voxel size per axis (array order), or one number for all axes; default 1 (voxel units).
        connectivity: See :func:`surface_mask`.

    Returns:
        A float64 array with one distance per surface voxel of ``a`` (empty when ``a`` is empty).

    Raises:
        ValueError: ``b`` is empty (no surface to measure to), or bad shapes / spacing.
    """
    a, b = _binary_pair(a, b, ("a", "b"))
    spacing = _normalize_spacing(spacing, a.ndim)
    _check_options(95.0, "pooled", connectivity)
    if not b.any():
        raise ValueError("b is empty: distances to its surface are undefined")
    if not a.any():
        return np.zeros(0, dtype=np.float64)
    box = _bbox(a | b)
    a, b = a[box], b[box]
    return _directed(_surface(a, connectivity), _surface(b, connectivity), spacing)


def hd95(pred: ArrayLike, gt: ArrayLike, spacing: Spacing = None, *, percentile: float = 95.0,
         combine: str = "pooled", connectivity: int = 1) -> float:
    """The 95th-percentile Hausdorff distance between two binary masks (2-D, 3-D or any dimension).

    Args:
        pred: Binary mask (non-zero is foreground), numpy array or tensor.
        gt: Binary mask of the same shape. The result is symmetric in ``pred`` and ``gt``.
        spacing: Voxel size per axis (array order, e.g. ``(z, y, x)`` for a ``(D, H, W)`` volume) or one number for
            all axes; default 1 (voxel units, as SAMed).
        percentile: The percentile (95: HD95; 100: the Hausdorff distance).
        combine: ``"pooled"`` (medpy / SAMed: the percentile of both directed distance sets together) or ``"max"``
            (MONAI: the larger of the two directed percentiles). See the module doc.
        connectivity: See :func:`surface_mask`.

    Returns:
        The distance as a float; ``NaN`` when either mask is empty.
    """
    _check_options(percentile, combine, connectivity)
    a, b = _binary_pair(pred, gt, ("pred", "gt"))
    spacing = _normalize_spacing(spacing, a.ndim)
    if not a.any() or not b.any():
        return float("nan")
    box = _bbox(a | b)
    sa, sb = _surface(a[box], connectivity), _surface(b[box], connectivity)
    d_ab, d_ba = _directed(sa, sb, spacing), _directed(sb, sa, spacing)
    if combine == "pooled":
        return float(np.percentile(np.concatenate([d_ab, d_ba]), percentile))
    return float(max(np.percentile(d_ab, percentile), np.percentile(d_ba, percentile)))


def dice_score(pred: ArrayLike, gt: ArrayLike) -> float:
    """The binary Dice ``2 |A n B| / (|A| + |B|)`` (non-zero is foreground); ``NaN`` when both masks are empty."""
    a, b = _binary_pair(pred, gt, ("pred", "gt"))
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return float("nan")
    return 2.0 * int(np.count_nonzero(a & b)) / total


def _per_class(p: np.ndarray, g: np.ndarray, classes: Sequence[int], spacing: Optional[tuple[float, ...]],
               percentile: float, combine: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Dice and HD95 of each class where both masks are non-empty (NaN elsewhere), and which masks are non-empty.

    Each class is cropped to the union of its bounding boxes (``find_objects``) before its masks are built.
    """
    nd = _ndimage()
    top = max(classes)
    boxes_p = nd.find_objects(p, max_label=top) if top > 0 else []
    boxes_g = nd.find_objects(g, max_label=top) if top > 0 else []
    n = len(classes)
    dice, hd = np.full(n, np.nan), np.full(n, np.nan)
    has_p, has_g = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    for j, c in enumerate(classes):
        if c == 0:  # find_objects skips label 0: the background spans the whole array
            a, b = p == 0, g == 0
            has_p[j], has_g[j] = bool(a.any()), bool(b.any())
        else:
            bp, bg = boxes_p[c - 1], boxes_g[c - 1]
            has_p[j], has_g[j] = bp is not None, bg is not None
            if not (has_p[j] and has_g[j]):
                continue
            box = _union_box(bp, bg)
            a, b = p[box] == c, g[box] == c
        if has_p[j] and has_g[j]:
            dice[j] = dice_score(a, b)
            hd[j] = hd95(a, b, spacing, percentile=percentile, combine=combine)
    return dice, hd, has_p, has_g


def case_scores(pred: ArrayLike, gt: ArrayLike, num_classes: int, spacing: Spacing = None,
                convention: str = "transunet", *, combine: str = "pooled",
                percentile: float = 95.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-foreground-class Dice and HD95 of one case (a 3-D volume, or a 2-D image), TransUNet / SAMed style.

    Args:
        pred: Predicted class ids, any dimension (``(D, H, W)`` for a volume); numpy array or tensor; integer, bool or
            integer-valued float.
        gt: Ground-truth class ids of the same shape.
        num_classes: ``K`` including the background (class 0, not scored).
        spacing: See :func:`hd95` (default: voxel units, as SAMed).
        convention: ``"transunet"`` or ``"nan"``, the empty-mask rules of the module doc's table.
        combine: See :func:`hd95`.
        percentile: See :func:`hd95`.

    Returns:
        ``(dice, hd95)``: two float64 arrays of shape ``(K - 1,)`` for classes ``1 .. K-1``.

    Raises:
        ValueError: shapes differ, class ids outside ``[0, K)``, or an unknown convention.
    """
    num_classes = _check_num_classes(num_classes)
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    _check_options(percentile, combine)
    p, g = _label_pair(pred, gt, num_classes)
    spacing = _normalize_spacing(spacing, p.ndim)
    dice, hd, has_p, has_g = _per_class(p, g, range(1, num_classes), spacing, percentile, combine)
    both = has_p & has_g
    if convention == "transunet":
        # SAMed's calculate_metric_percase: a prediction without ground truth scores (1, 0), anything else (0, 0).
        pred_only = has_p & ~has_g
        dice = np.where(both, dice, np.where(pred_only, 1.0, 0.0))
        hd = np.where(both, hd, 0.0)
    else:
        # Dice is 0 when exactly one mask is empty and 0/0 when both are; HD95 needs both surfaces.
        dice = np.where(both, dice, np.where(has_p | has_g, 0.0, np.nan))
    return dice.astype(np.float64), hd.astype(np.float64)


def _nanmean(x: np.ndarray, axis: Optional[int] = None) -> Union[np.ndarray, float]:
    with warnings.catch_warnings():  # all-NaN slices give NaN, which is the intended answer
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


# -- torchmetrics ------------------------------------------------------------------------------------------------------
class HausdorffDistance95(Metric):
    """HD95 per sample and class, averaged over the cases where it is defined (torchmetrics ``Metric``).

    Each sample of a batch (a 2-D image, or a 3-D volume) is scored on its own: for every class whose predicted and
    ground-truth masks are both non-empty, :func:`hd95` joins that class's running mean; other (sample, class) pairs
    are skipped (``NaN``-skipping; the TransUNet zeros are per-volume conventions, see :class:`VolumeAccumulator`).
    The states are sums and counts, so the metric syncs across processes like any torchmetrics metric.

    Args:
        num_classes: ``K`` including the background.
        include_background: Also score class 0.
        spacing: Pixel / voxel size per spatial axis, or one number; default 1.
        percentile: See :func:`hd95`.
        combine: See :func:`hd95`.
        average: ``"macro"``: :meth:`compute` returns the mean over classes of the per-class means (classes without a
            defined case left out; ``NaN`` if none); ``"none"``: the per-class vector (``NaN`` for such classes).
        kwargs: torchmetrics ``Metric`` options.

    Example::

        hd = HausdorffDistance95(num_classes=9)
        hd.update(preds, target)  # (B, H, W) class-id maps
        hd.compute()              # tensor(mean HD95 over the foreground classes)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_classes: int, include_background: bool = False, spacing: Spacing = None,
                 percentile: float = 95.0, combine: str = "pooled", average: str = "macro", **kwargs: Any) -> None:
        if Metric is object:  # pragma: no cover
            raise ImportError("HausdorffDistance95 needs torchmetrics: `pip install torchmetrics`")
        num_classes = _check_num_classes(num_classes)
        _check_options(percentile, combine)
        if average not in ("macro", "none"):
            raise ValueError(f"average must be 'macro' or 'none', got {average!r}")
        if spacing is not None:
            _normalize_spacing(spacing, 1 if np.ndim(spacing) == 0 else len(spacing))
        super().__init__(**kwargs)
        self.num_classes, self.include_background = num_classes, bool(include_background)
        self.spacing, self.percentile, self.combine, self.average = spacing, float(percentile), combine, average
        self.classes = list(range(0 if include_background else 1, num_classes))
        n = len(self.classes)
        self.add_state("total", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of ``(B, H, W)`` (or ``(B, D, H, W)``) class-id maps.

        Raises:
            ValueError: shapes differ, fewer than 2 dimensions, or class ids outside ``[0, K)``.
        """
        if tuple(preds.shape) != tuple(target.shape) or preds.dim() < 2:
            raise ValueError(f"preds and target must be class-id maps (B, H, W) of one shape, got "
                             f"{tuple(preds.shape)} and {tuple(target.shape)}")
        p, g = _label_pair(preds, target, self.num_classes)
        spacing = _normalize_spacing(self.spacing, p.ndim - 1)
        total, count = np.zeros(len(self.classes)), np.zeros(len(self.classes))
        for i in range(p.shape[0]):
            _, hd, _, _ = _per_class(p[i], g[i], self.classes, spacing, self.percentile, self.combine)
            ok = ~np.isnan(hd)
            total[ok] += hd[ok]
            count[ok] += 1
        self.total += torch.from_numpy(total).to(self.total)
        self.count += torch.from_numpy(count).to(self.count)

    def compute(self) -> torch.Tensor:
        """The macro mean (``average="macro"``) or the per-class means (``"none"``)."""
        per_class = self.total / self.count  # 0 / 0 = NaN for classes without a defined case
        if self.average == "none":
            return per_class
        valid = per_class[~torch.isnan(per_class)]
        return valid.mean() if valid.numel() else torch.tensor(float("nan"), dtype=per_class.dtype,
                                                               device=per_class.device)


# -- volumes -----------------------------------------------------------------------------------------------------------
@dataclass
class VolumeScores:
    """Per-volume scores of :meth:`VolumeAccumulator.compute`.

    Attributes:
        volume_ids: The volumes, sorted.
        dice: ``(V, K - 1)`` Dice per volume and foreground class.
        hd95: ``(V, K - 1)`` HD95 per volume and foreground class.
    """

    volume_ids: list[int]
    dice: np.ndarray
    hd95: np.ndarray

    @property
    def dice_per_class(self) -> np.ndarray:
        """``(K - 1,)`` mean Dice over the volumes (NaN-skipping)."""
        return _nanmean(self.dice, axis=0)

    @property
    def hd95_per_class(self) -> np.ndarray:
        """``(K - 1,)`` mean HD95 over the volumes (NaN-skipping)."""
        return _nanmean(self.hd95, axis=0)

    @property
    def mean_dice(self) -> float:
        """The mean over classes of :attr:`dice_per_class` (SAMed's "mean_dice")."""
        return float(_nanmean(self.dice_per_class))

    @property
    def mean_hd95(self) -> float:
        """The mean over classes of :attr:`hd95_per_class` (SAMed's "mean_hd95")."""
        return float(_nanmean(self.hd95_per_class))

    def summary(self) -> dict[str, float]:
        """``{"dice": ..., "hd95": ..., "dice_1": ..., "hd95_1": ..., ...}`` (classes numbered from 1), for logging."""
        out = {"dice": self.mean_dice, "hd95": self.mean_hd95}
        for c, (d, h) in enumerate(zip(self.dice_per_class, self.hd95_per_class), start=1):
            out[f"dice_{c}"], out[f"hd95_{c}"] = float(d), float(h)
        return out


class VolumeAccumulator:
    """Collects per-slice predictions keyed by ``(volume id, slice index)`` and scores whole volumes.

    :meth:`update` stores each slice's prediction and label (on the CPU, as ``uint8`` when ``K <= 256``);
    :meth:`compute` stacks every volume's slices in slice order into ``(D, H, W)`` arrays and scores them with
    :func:`case_scores`. Slices may arrive in any order and batches may mix volumes.

    Single process: a volume must be complete in this accumulator's own process. Under DDP every rank sees only its
    shard of the slices (and ``DistributedSampler`` pads with repeated samples, which :meth:`update` rejects as
    duplicates), so evaluate volumes on one device.

    Args:
        num_classes: ``K`` including the background.
        spacing: Voxel size ``(slice axis, H, W)`` for every volume, or a mapping volume id -> spacing; default 1
            (voxel units, as SAMed).
        convention: ``"transunet"`` (SAMed's published numbers) or ``"nan"``, see :func:`case_scores`.
        combine: See :func:`hd95`.
        percentile: See :func:`hd95`.
    """

    def __init__(self, num_classes: int, spacing: Optional[Union[Sequence[float], Mapping[int, Sequence[float]]]]
                 = None, convention: str = "transunet", combine: str = "pooled", percentile: float = 95.0) -> None:
        self.num_classes = _check_num_classes(num_classes)
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        _check_options(percentile, combine)
        if spacing is not None and not isinstance(spacing, Mapping):
            spacing = _normalize_spacing(spacing, 3)
        self.spacing, self.convention, self.combine, self.percentile = spacing, convention, combine, float(percentile)
        self._dtype = np.uint8 if self.num_classes <= 256 else np.int32
        self._slices: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}

    def __len__(self) -> int:
        """The number of slices stored."""
        return sum(len(v) for v in self._slices.values())

    @property
    def volume_ids(self) -> list[int]:
        """The volumes seen so far, sorted."""
        return sorted(self._slices)

    def reset(self) -> None:
        """Forget every slice."""
        self._slices = {}

    @staticmethod
    def _ids(x: Any, name: str, n: int) -> list[int]:
        arr = _to_numpy(x, name) if isinstance(x, (torch.Tensor, np.ndarray)) else np.asarray(x)
        arr = arr.reshape(-1) if arr.ndim == 0 else arr
        if arr.ndim != 1 or len(arr) != n or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise ValueError(f"{name} must be {n} integers (one per slice of the batch), got shape {arr.shape} and "
                             f"dtype {arr.dtype}")
        if arr.size and int(arr.min()) < 0:
            raise ValueError(f"{name} must be >= 0, got {arr[arr < 0][:4].tolist()}")
        return [int(v) for v in arr]

    def update(self, preds: ArrayLike, target: ArrayLike, volume_ids: Any, slice_ids: Any) -> None:
        """Store a batch of slices.

        Args:
            preds: ``(B, H, W)`` predicted class ids (tensor or array).
            target: ``(B, H, W)`` ground-truth class ids.
            volume_ids: ``(B,)`` volume of each slice (e.g. the dataset's ``volume_index``).
            slice_ids: ``(B,)`` position of each slice in its volume.

        Raises:
            ValueError: bad shapes or ids, class ids outside ``[0, K)``, a ``(volume, slice)`` pair already stored (or
                twice in the batch), or a slice whose size differs from its volume's other slices. Nothing is
                stored then.
        """
        p, g = _label_pair(preds, target, self.num_classes)
        if p.ndim != 3:
            raise ValueError(f"preds and target must be (B, H, W) batches of slices, got shape {p.shape}")
        vids, sids = self._ids(volume_ids, "volume_ids", p.shape[0]), self._ids(slice_ids, "slice_ids", p.shape[0])
        keys = list(zip(vids, sids))
        seen = set()
        for v, s in keys:
            if (v, s) in seen or s in self._slices.get(v, {}):
                raise ValueError(f"slice {s} of volume {v} was added twice (duplicate samples, e.g. a "
                                 "DistributedSampler's padding: evaluate volumes in one process without padding)")
            seen.add((v, s))
            stored = self._slices.get(v)
            if stored:
                shape = next(iter(stored.values()))[0].shape
                if shape != p.shape[1:]:
                    raise ValueError(f"volume {v}: slice {s} has size {p.shape[1:]}, its other slices {shape}")
        for i, (v, s) in enumerate(keys):
            self._slices.setdefault(v, {})[s] = (p[i].astype(self._dtype), g[i].astype(self._dtype))

    def _spacing_of(self, volume: int) -> Optional[tuple[float, ...]]:
        if isinstance(self.spacing, Mapping):
            if volume not in self.spacing:
                raise ValueError(f"spacing has no entry for volume {volume} (it has {sorted(self.spacing)[:8]})")
            return _normalize_spacing(self.spacing[volume], 3)
        return self.spacing

    def volume(self, volume: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``(D, H, W)`` prediction and label of a stored volume, slices in order.

        Raises:
            ValueError: an unknown volume, or missing slices (indices must run 0 .. D-1).
        """
        if volume not in self._slices:
            raise ValueError(f"no slices of volume {volume} were added (volumes: {self.volume_ids[:8]})")
        slices = self._slices[volume]
        order = sorted(slices)
        if order[-1] != len(order) - 1:
            missing = sorted(set(range(order[-1] + 1)) - set(order))
            raise ValueError(f"volume {volume} is incomplete: slices {missing[:8]} of 0..{order[-1]} were never added "
                             "(every slice of a volume must reach this accumulator)")
        return np.stack([slices[z][0] for z in order]), np.stack([slices[z][1] for z in order])

    def compute(self) -> VolumeScores:
        """Score every volume with :func:`case_scores`.

        Raises:
            ValueError: no slices, or an incomplete volume (see :meth:`volume`).
        """
        if not self._slices:
            raise ValueError("VolumeAccumulator.compute: no slices were added")
        ids = self.volume_ids
        dice, hd = [], []
        for v in ids:
            pred, gt = self.volume(v)
            d, h = case_scores(pred, gt, self.num_classes, self._spacing_of(v), self.convention,
                               combine=self.combine, percentile=self.percentile)
            dice.append(d)
            hd.append(h)
        return VolumeScores(ids, np.stack(dice), np.stack(hd))
