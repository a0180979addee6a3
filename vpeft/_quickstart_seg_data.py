"""Data of ``vpeft quickstart --task segmentation``: scikit-image's bundled images with derived masks (or a labelled
synthetic stand-in), the region split of the target image and its 64x64 tiles. The procedures are documented in
:mod:`vpeft.quickstart_segmentation`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

SOURCE_IMAGES = ("camera", "page", "text", "hubble_deep_field", "immunohistochemistry")
TARGET_IMAGE = "coins"
TILE = 64
# regions of the 303 x 384 target (rows, cols) as [start, stop) slices
POOL_REGION = ((0, 200), (0, 192))
VAL_REGION = ((200, 303), (0, 192))
TEST_REGION = ((0, 303), (192, 384))


@dataclass
class Picture:
    """One image with its derived binary mask.

    Attributes:
        name: Image name (``skimage.data`` function, or ``synthetic-*``).
        image: ``(H, W, 3)`` float32 RGB on the 0..255 scale.
        mask: ``(H, W)`` uint8 foreground mask (0/1).
    """

    name: str
    image: np.ndarray
    mask: np.ndarray


@dataclass
class SegData:
    """Source pictures (pretraining) and the target picture (few-shot task), with provenance."""

    sources: list[Picture]
    target: Picture
    name: str
    source: str
    mask_procedure: dict = field(default_factory=dict)


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def _grey(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a if a.ndim == 2 else a[..., :3] @ np.array([0.2125, 0.7154, 0.0721])


def _remove_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask)
    if n == 0:
        return mask.astype(np.uint8)
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[lab].astype(np.uint8)


def otsu_threshold(grey: np.ndarray) -> float:
    """Otsu's threshold on a 256-bin histogram (maximum between-class variance); values above it are one class."""
    hist, edges = np.histogram(grey.ravel(), bins=256)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centers)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centers[int(np.argmax(between[:-1]))])


def minority_otsu_mask(grey: np.ndarray) -> np.ndarray:
    """Source-image mask: the Otsu side with fewer pixels, 3x3 opening, components under 16 pixels removed."""
    from scipy import ndimage as ndi

    bright = grey > otsu_threshold(grey)
    fg = bright if bright.mean() <= 0.5 else ~bright
    fg = ndi.binary_opening(fg, structure=np.ones((3, 3), bool))
    return _remove_small(fg, 16)


def coins_mask(coins: np.ndarray) -> np.ndarray:
    """scikit-image's gallery coins segmentation: Sobel elevation, markers <30 / >150, watershed, fill holes."""
    from scipy import ndimage as ndi
    from skimage.filters import sobel
    from skimage.segmentation import watershed

    markers = np.zeros(coins.shape, dtype=np.int32)
    markers[coins < 30] = 1
    markers[coins > 150] = 2
    seg = watershed(sobel(coins), markers)
    return _remove_small(ndi.binary_fill_holes(seg == 2), 64)


def load_skimage() -> SegData:
    """scikit-image's bundled images with derived masks (see the module docstring)."""
    import skimage
    from skimage import data as skd

    sources = []
    for name in SOURCE_IMAGES:
        a = getattr(skd, name)()
        sources.append(Picture(name, _rgb(a), minority_otsu_mask(_grey(a))))
    coins = skd.coins()
    return SegData(sources, Picture(TARGET_IMAGE, _rgb(coins), coins_mask(coins)), "skimage",
                   f"scikit-image {skimage.__version__} bundled images (skimage.data; masks derived, not annotated): "
                   f"target {TARGET_IMAGE}, pretraining sources {', '.join(SOURCE_IMAGES)}",
                   dict(target="scikit-image gallery coins procedure: Sobel elevation map, watershed from markers "
                               "pixel<30 (background) / pixel>150 (coin), holes filled, components <64 px removed",
                        sources="Otsu threshold of the grey image, foreground = the side with fewer pixels, 3x3 "
                                "binary opening, components <16 px removed"))


def _smooth_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    from scipy import ndimage as ndi

    n = ndi.gaussian_filter(rng.standard_normal((h, w)), sigma)
    return n / (n.std() + 1e-8)


def synthetic_picture(rng: np.random.Generator, name: str, h: int, w: int, coins: bool) -> Picture:
    """A textured scene with exact masks: coin-like bright discs on a 4x6 grid (``coins``), else random ellipses
    brighter or darker than a gradient background."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    grey = 60 + 40 * (xx / w) + 12 * _smooth_noise(rng, h, w, 6) + 6 * rng.standard_normal((h, w))
    mask = np.zeros((h, w), bool)
    if coins:
        for r in range(4):
            for c in range(6):
                cy = (r + 0.5) * h / 4 + rng.uniform(-6, 6)
                cx = (c + 0.5) * w / 6 + rng.uniform(-6, 6)
                rad = rng.uniform(14, 22)
                d = np.hypot(yy - cy, xx - cx)
                disc = d < rad
                grey[disc] = 170 + 25 * np.cos(d[disc] / 3.0) + 10 * rng.standard_normal(disc.sum())
                mask |= disc
    else:
        sign = 1 if rng.random() < 0.5 else -1
        for _ in range(int(rng.integers(8, 16))):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ay, ax = rng.uniform(6, 28, size=2)
            ell = ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 < 1
            grey[ell] += sign * rng.uniform(50, 90)
            mask |= ell
    return Picture(name, _rgb(np.clip(grey, 0, 255)), mask.astype(np.uint8))


def load_synthetic(seed: int = 0) -> SegData:
    """The stand-in without scikit-image: 5 ellipse scenes (sources) and one coin-like disc scene (target)."""
    rng = np.random.default_rng(seed)
    sources = [synthetic_picture(rng, f"synthetic-ellipses-{i}", 256, 256, coins=False) for i in range(5)]
    target = synthetic_picture(rng, "synthetic-discs", 303, 384, coins=True)
    return SegData(sources, target, "synthetic",
                   "SYNTHETIC stand-in (scikit-image is not installed: pip install scikit-image); textured ellipses "
                   "and coin-like discs with exact masks; the numbers say nothing about real images",
                   dict(target="exact (generated)", sources="exact (generated)"))


def load_data(which: str = "auto", log: Callable[[str], None] = print) -> SegData:
    """``skimage`` (real images), ``synthetic``, or ``auto`` (scikit-image when installed, else synthetic)."""
    if which not in ("auto", "skimage", "synthetic"):
        raise ValueError(f"unknown dataset {which!r}; accepted: auto, skimage, synthetic")
    if which in ("auto", "skimage"):
        try:
            return load_skimage()
        except ImportError as e:
            if which == "skimage":
                raise SystemExit(f"vpeft quickstart --task segmentation: scikit-image is not installed ({e}); "
                                 "pip install scikit-image") from None
            log("scikit-image is not installed: using the SYNTHETIC stand-in (pip install scikit-image for real "
                "images)")
    return load_synthetic()


def _region_tiles(region: tuple, stride: int) -> list[tuple[int, int]]:
    (r0, r1), (c0, c1) = region
    return [(y, x) for y in range(r0, r1 - TILE + 1, stride) for x in range(c0, c1 - TILE + 1, stride)]


def _crop(p: Picture, y: int, x: int) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.from_numpy(p.image[y:y + TILE, x:x + TILE]).permute(2, 0, 1)
    return img, torch.from_numpy(p.mask[y:y + TILE, x:x + TILE].astype(np.int64))


def _stack(p: Picture, corners: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [_crop(p, y, x) for y, x in corners]
    return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])


def shot_corners(n: int, seed: int) -> list[tuple[int, int]]:
    """Top-left corners of the N shots of ``seed``: the first N of a seed's random crops in the pool region."""
    rng = np.random.default_rng(10_000 + seed)
    (r0, r1), (c0, c1) = POOL_REGION
    ys = rng.integers(r0, r1 - TILE + 1, size=64)
    xs = rng.integers(c0, c1 - TILE + 1, size=64)
    return [(int(y), int(x)) for y, x in zip(ys[:n], xs[:n])]


def eval_tiles(data: SegData, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation tiles (stride-32 grid) of the test or validation region."""
    if split not in ("test", "val"):
        raise ValueError(f"eval_split must be 'test' or 'val', got {split!r}")
    return _stack(data.target, _region_tiles(TEST_REGION if split == "test" else VAL_REGION, 32))


def _dihedral(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k, flip = int(torch.randint(4, (1,), generator=g)), bool(torch.randint(2, (1,), generator=g))
    x, y = torch.rot90(x, k, (-2, -1)), torch.rot90(y, k, (-2, -1))
    if flip:
        x, y = x.flip(-1), y.flip(-1)
    return x, y
