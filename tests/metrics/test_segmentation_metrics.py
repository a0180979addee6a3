"""Medical segmentation metrics (vpeft.metrics.segmentation): HD95 against a brute-force all-pairs reference and hand
computations, the TransUNet / SAMed per-case convention table, the torchmetrics HD95 metric and the volume
accumulator against direct calls."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("scipy")

from vpeft.metrics import (  # noqa: E402
    HausdorffDistance95,
    VolumeAccumulator,
    case_scores,
    dice_score,
    hd95,
    surface_distances,
    surface_mask,
)


# -- an independent reference --------------------------------------------------------------------------------------
def brute_surface(mask: np.ndarray) -> torch.Tensor:
    """Foreground voxels with at least one background face neighbour; outside the array counts as background."""
    m = torch.from_numpy(np.asarray(mask, dtype=bool))
    nd = m.dim()
    padded = F.pad(m.to(torch.uint8), (1, 1) * nd).bool()
    centre = tuple(slice(1, -1) for _ in range(nd))
    interior = m.clone()
    for axis in range(nd):
        for shift in (-1, 1):
            interior &= padded.roll(shift, axis)[centre]
    return m & ~interior


def brute_hd(a: np.ndarray, b: np.ndarray, spacing=None, q: float = 95.0, combine: str = "pooled") -> float:
    """All pairwise distances between the two surfaces (torch.cdist), no distance transform."""
    scale = torch.ones(a.ndim, dtype=torch.float64) if spacing is None else torch.tensor(spacing, dtype=torch.float64)
    pa = brute_surface(a).nonzero().double() * scale
    pb = brute_surface(b).nonzero().double() * scale
    d = torch.cdist(pa, pb)
    d_ab, d_ba = d.min(dim=1).values, d.min(dim=0).values
    if combine == "pooled":
        return torch.quantile(torch.cat([d_ab, d_ba]), q / 100).item()  # linear interpolation, as numpy's default
    return max(torch.quantile(d_ab, q / 100).item(), torch.quantile(d_ba, q / 100).item())


def random_mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Either speckle noise or a union of boxes (touching the border now and then)."""
    if rng.random() < 0.4:
        return rng.random(shape) < rng.uniform(0.05, 0.5)
    m = np.zeros(shape, dtype=bool)
    for _ in range(rng.integers(1, 4)):
        lo = [int(rng.integers(0, s)) for s in shape]
        hi = [int(rng.integers(a + 1, s + 1)) for a, s in zip(lo, shape)]
        m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


# -- HD95 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("combine", ["pooled", "max"])
def test_hd95_matches_brute_force_with_anisotropic_spacing(ndim, combine):
    rng = np.random.default_rng(ndim * 10 + len(combine))
    checked = 0
    for _ in range(25):
        shape = tuple(int(s) for s in rng.integers(4, 14 if ndim == 3 else 24, ndim))
        a, b = random_mask(rng, shape), random_mask(rng, shape)
        if not a.any() or not b.any():
            continue
        spacing = tuple(float(s) for s in rng.uniform(0.4, 3.0, ndim))
        for sp in (None, spacing):
            want = brute_hd(a, b, sp, 95.0, combine)
            assert hd95(a, b, sp, combine=combine) == pytest.approx(want, rel=1e-9, abs=1e-9)
        # The Hausdorff distance (percentile 100) and another percentile through the same path.
        assert hd95(a, b, spacing, percentile=100, combine=combine) == pytest.approx(
            brute_hd(a, b, spacing, 100.0, combine), rel=1e-9)
        assert hd95(a, b, spacing, percentile=50, combine=combine) == pytest.approx(
            brute_hd(a, b, spacing, 50.0, combine), rel=1e-9, abs=1e-9)
        assert hd95(b, a, spacing, combine=combine) == pytest.approx(hd95(a, b, spacing, combine=combine))
        checked += 1
    assert checked >= 20


def test_surface_and_directed_distances_match_brute_force():
    rng = np.random.default_rng(3)
    a, b = random_mask(rng, (9, 8, 7)), random_mask(rng, (9, 8, 7))
    a[0, 0, 0] = b[4, 4, 4] = True
    np.testing.assert_array_equal(surface_mask(a), brute_surface(a).numpy())
    sp = (2.0, 0.5, 1.25)
    scale = torch.tensor(sp, dtype=torch.float64)
    d = torch.cdist(brute_surface(a).nonzero().double() * scale, brute_surface(b).nonzero().double() * scale)
    np.testing.assert_allclose(surface_distances(a, b, sp), d.min(dim=1).values.numpy(), rtol=1e-12)
    # A full square's surface is its border ring (outside the array is background).
    np.testing.assert_array_equal(surface_mask(np.ones((4, 5))), np.pad(np.zeros((2, 3), bool), 1, constant_values=1))


def test_hd95_hand_computed():
    # Two parallel 1-pixel lines k rows apart: every surface distance is k (rows scaled by the row spacing).
    for k in (1, 3, 6):
        a, b = np.zeros((10, 12), bool), np.zeros((10, 12), bool)
        a[2, 1:11] = True
        b[2 + k, 1:11] = True
        assert hd95(a, b) == k and hd95(a, b, combine="max") == k
        assert hd95(a, b, spacing=(0.5, 3.0)) == pytest.approx(0.5 * k)
    # A = {(0, 0)}, B = {(0, 0), (0, 10)}: d(A->B) = [0], d(B->A) = [0, 10].
    # pooled: P95 of [0, 0, 10] = 0 + 0.9 * 10 (position 0.95 * 2 = 1.9); max: max(0, P95([0, 10]) = 9.5).
    a, b = np.zeros((3, 12), bool), np.zeros((3, 12), bool)
    a[0, 0] = b[0, 0] = b[0, 10] = True
    assert hd95(a, b) == pytest.approx(9.0) and hd95(a, b, combine="max") == pytest.approx(9.5)
    # Single voxels in 3-D with spacing (2, 0.5, 1): sqrt((1 * 2)^2 + (3 * 0.5)^2 + (4 * 1)^2).
    a, b = np.zeros((2, 4, 5), bool), np.zeros((2, 4, 5), bool)
    a[0, 0, 0], b[1, 3, 4] = True, True
    assert hd95(a, b, (2.0, 0.5, 1.0)) == pytest.approx(math.sqrt(4 + 2.25 + 16))
    assert hd95(torch.from_numpy(a), torch.from_numpy(a)) == 0.0  # tensors accepted; identical masks -> 0


def test_hd95_empty_and_bad_input():
    m = np.zeros((4, 4), bool)
    m[1, 1] = True
    assert math.isnan(hd95(m, np.zeros((4, 4)))) and math.isnan(hd95(np.zeros((4, 4)), m))
    assert math.isnan(hd95(np.zeros((4, 4)), np.zeros((4, 4))))
    assert surface_distances(np.zeros((4, 4)), m).size == 0
    with pytest.raises(ValueError, match="b is empty"):
        surface_distances(m, np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"same shape.*\(4, 4\) and \(4, 5\)"):
        hd95(m, np.zeros((4, 5)))
    with pytest.raises(ValueError, match="spacing has 3 values for 2-D"):
        hd95(m, m, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive and finite"):
        hd95(m, m, (1.0, 0.0))
    with pytest.raises(ValueError, match="combine must be one of"):
        hd95(m, m, combine="mean")
    with pytest.raises(ValueError, match=r"percentile must be a number in \[0, 100\]"):
        hd95(m, m, percentile=101)
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        hd95([[1]], [[1]])


def test_dice_score():
    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[:2, :2], b[:2, :3] = True, True  # |A| = 4, |B| = 6, |A n B| = 4
    assert dice_score(a, b) == pytest.approx(0.8)
    assert dice_score(a, np.zeros((4, 4))) == 0.0 and math.isnan(dice_score(np.zeros(3), np.zeros(3)))


# -- per-case conventions ------------------------------------------------------------------------------------------
def convention_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """K = 5: class 1 in both, 2 predicted only, 3 in the ground truth only, 4 nowhere."""
    pred, gt = np.zeros((3, 8, 8), np.int64), np.zeros((3, 8, 8), np.int64)
    gt[1, 1:3, 1:3] = 1
    pred[1, 1:3, 1:4] = 1
    pred[0, 5:7, 5:7] = 2
    gt[2, 5, 1:4] = 3
    return pred, gt, pred == 1, gt == 1


def test_case_scores_convention_table():
    pred, gt, p1, g1 = convention_case()
    d1, h1 = 0.8, hd95(p1, g1)  # |A| = 6, |B| = 4, overlap 4
    assert h1 == pytest.approx(brute_hd(p1, g1))
    dice, hd = case_scores(pred, gt, 5)
    np.testing.assert_allclose(dice, [d1, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(hd, [h1, 0.0, 0.0, 0.0])
    dice, hd = case_scores(pred, gt, 5, convention="nan")
    np.testing.assert_allclose(dice, [d1, 0.0, 0.0, np.nan])
    np.testing.assert_allclose(hd, [h1, np.nan, np.nan, np.nan])
    # Spacing reaches HD95; float labels with integer values (SAMed's float32 labels) and tensors are accepted.
    _, hd = case_scores(torch.from_numpy(pred), gt.astype(np.float32), 5, spacing=(3.0, 1.0, 0.5))
    assert hd[0] == pytest.approx(hd95(p1, g1, (3.0, 1.0, 0.5)))
    dice, _ = case_scores(pred[1], gt[1], 5)  # 2-D cases work the same way
    assert dice[0] == pytest.approx(d1)


def test_case_scores_match_per_class_calls_on_random_volumes():
    rng = np.random.default_rng(7)
    gt = np.zeros((6, 20, 18), np.int64)
    for c in (1, 2, 3):
        gt[tuple(slice(int(rng.integers(0, s // 2)), int(rng.integers(s // 2, s))) for s in gt.shape)] = c
    pred = np.where(rng.random(gt.shape) < 0.1, rng.integers(0, 4, gt.shape), gt)
    dice, hd = case_scores(pred, gt, 4, spacing=(2.5, 0.8, 0.8))
    for c in (1, 2, 3):
        assert dice[c - 1] == pytest.approx(dice_score(pred == c, gt == c))
        assert hd[c - 1] == pytest.approx(brute_hd(pred == c, gt == c, (2.5, 0.8, 0.8)), rel=1e-9)


def test_case_scores_errors():
    pred, gt, _, _ = convention_case()
    with pytest.raises(ValueError, match=r"class ids \[5\] outside \[0, 5\)"):
        case_scores(np.where(pred == 2, 5, pred), gt, 5)
    with pytest.raises(ValueError, match="same shape"):
        case_scores(pred, gt[:2], 5)
    with pytest.raises(ValueError, match="convention must be one of"):
        case_scores(pred, gt, 5, convention="medpy")
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        case_scores(pred, gt, 1)
    with pytest.raises(ValueError, match="integer class ids"):
        case_scores(pred + 0.5, gt, 5)


# -- the torchmetrics metric ---------------------------------------------------------------------------------------
def blob_batch(rng: np.random.Generator, b: int, k: int, size=(16, 14)) -> tuple[torch.Tensor, torch.Tensor]:
    target = np.zeros((b, *size), np.int64)
    for i in range(b):
        for c in rng.permutation(np.arange(1, k))[: rng.integers(0, k)]:
            y, x = int(rng.integers(0, size[0] - 3)), int(rng.integers(0, size[1] - 3))
            target[i, y:y + int(rng.integers(2, 7)), x:x + int(rng.integers(2, 7))] = c
    preds = np.where(rng.random(target.shape) < 0.08, rng.integers(0, k, target.shape), target)
    return torch.from_numpy(preds), torch.from_numpy(target)


def test_hd95_metric_matches_direct_calls():
    rng = np.random.default_rng(11)
    k, spacing = 5, (1.5, 0.5)
    batches = [blob_batch(rng, 3, k - 1) for _ in range(3)]  # class 4 never occurs: undefined everywhere
    metric = HausdorffDistance95(k, spacing=spacing)
    per_class = HausdorffDistance95(k, spacing=spacing, average="none")
    with_bg = HausdorffDistance95(k, include_background=True, average="none")
    values: dict[int, list[float]] = {c: [] for c in range(k)}
    for preds, target in batches:
        for m in (metric, per_class, with_bg):
            m.update(preds, target)
        for i in range(len(preds)):
            for c in range(k):
                a, b = (preds[i] == c).numpy(), (target[i] == c).numpy()
                if a.any() and b.any():
                    values[c].append(hd95(a, b, spacing) if c else hd95(a, b))
    want = [np.mean(values[c]) if values[c] else np.nan for c in range(1, k)]
    assert np.isnan(want[-1]) and not np.isnan(want[:-1]).any()
    np.testing.assert_allclose(per_class.compute().numpy(), want, rtol=1e-12)
    assert metric.compute().item() == pytest.approx(np.nanmean(want), rel=1e-12)
    assert with_bg.compute()[0].item() == pytest.approx(np.mean(values[0]), rel=1e-12)
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(metric.compute().item())
    with pytest.raises(ValueError, match=r"class-id maps \(B, H, W\) of one shape"):
        metric.update(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        metric.update(torch.full((1, 4, 4), 7), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="average must be"):
        HausdorffDistance95(k, average="micro")


# -- volumes ---------------------------------------------------------------------------------------------------------
def two_volumes(rng: np.random.Generator, k: int = 4) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    vols = {}
    for vid, depth in ((3, 5), (8, 7)):
        gt = np.zeros((depth, 12, 10), np.int64)
        for c in range(1, k - (vid == 3)):  # volume 3 has no class k-1
            z0, y0, x0 = int(rng.integers(0, depth - 2)), int(rng.integers(0, 8)), int(rng.integers(0, 6))
            gt[z0:z0 + 3, y0:y0 + 4, x0:x0 + 4] = c
        pred = np.where(rng.random(gt.shape) < 0.05, rng.integers(0, k, gt.shape), gt)
        if vid == 3:
            pred[0, 0, 0] = k - 1  # a predicted organ the volume does not contain
        else:
            pred[pred == 2] = 0  # a missed organ
        vols[vid] = (pred, gt)
    return vols


@pytest.mark.parametrize("convention", ["transunet", "nan"])
def test_volume_accumulator_reassembles_out_of_order_slices(convention):
    rng = np.random.default_rng(5)
    k, spacing = 4, (2.0, 0.7, 0.7)
    vols = two_volumes(rng, k)
    keys = [(v, z) for v, (p, _) in vols.items() for z in range(len(p))]
    order = rng.permutation(len(keys))
    acc = VolumeAccumulator(k, spacing=spacing, convention=convention)
    for chunk in np.array_split(order, 4):  # batches mixing both volumes, slices shuffled
        vids = torch.tensor([keys[i][0] for i in chunk])
        sids = torch.tensor([keys[i][1] for i in chunk])
        preds = torch.from_numpy(np.stack([vols[keys[i][0]][0][keys[i][1]] for i in chunk]))
        target = torch.from_numpy(np.stack([vols[keys[i][0]][1][keys[i][1]] for i in chunk]))
        acc.update(preds, target, vids, sids)
    assert len(acc) == len(keys) and acc.volume_ids == [3, 8]
    np.testing.assert_array_equal(acc.volume(8)[1], vols[8][1])
    scores = acc.compute()
    direct = [case_scores(*vols[v], k, spacing, convention) for v in (3, 8)]
    np.testing.assert_allclose(scores.dice, np.stack([d for d, _ in direct]))
    np.testing.assert_allclose(scores.hd95, np.stack([h for _, h in direct]))
    # SAMed: per-class mean over the volumes, then the mean over the classes (NaN-skipping for "nan").
    per_class = np.nanmean(np.stack([d for d, _ in direct]), axis=0)
    np.testing.assert_allclose(scores.dice_per_class, per_class)
    assert scores.mean_dice == pytest.approx(np.nanmean(per_class))
    assert scores.mean_hd95 == pytest.approx(np.nanmean(np.nanmean(np.stack([h for _, h in direct]), axis=0)))
    summary = scores.summary()
    assert summary["dice"] == scores.mean_dice and summary["hd95_3"] == pytest.approx(scores.hd95_per_class[2])
    # Volume 3 predicts class 3 it lacks; volume 8 misses class 2.
    if convention == "transunet":
        assert (scores.dice[0, 2], scores.hd95[0, 2], scores.dice[1, 1], scores.hd95[1, 1]) == (1.0, 0.0, 0.0, 0.0)
    else:
        assert scores.dice[0, 2] == 0.0 and scores.dice[1, 1] == 0.0
        assert np.isnan(scores.hd95[0, 2]) and np.isnan(scores.hd95[1, 1])
    acc.reset()
    assert len(acc) == 0


def test_volume_accumulator_errors():
    acc = VolumeAccumulator(3)
    z = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="no slices were added"):
        acc.compute()
    acc.update(z, z, [0, 0], [0, 2])
    with pytest.raises(ValueError, match="slice 2 of volume 0 was added twice"):
        acc.update(z[:1], z[:1], [0], [2])
    with pytest.raises(ValueError, match="slice 5 of volume 1 was added twice"):
        acc.update(z, z, [1, 1], [5, 5])
    with pytest.raises(ValueError, match=r"volume 0: slice 3 has size \(4, 5\)"):
        acc.update(torch.zeros(1, 4, 5, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long), [0], [3])
    with pytest.raises(ValueError, match="volume_ids must be 2 integers"):
        acc.update(z, z, [0], [3, 4])
    with pytest.raises(ValueError, match=r"\(B, H, W\) batches"):
        acc.update(z[0], z[0], [0], [3])
    assert len(acc) == 2  # the failed updates stored nothing
    with pytest.raises(ValueError, match=r"volume 0 is incomplete: slices \[1\] of 0..2"):
        acc.compute()
    acc.update(z[:1], z[:1], [0], [1])
    assert acc.compute().dice.shape == (1, 2)
    with pytest.raises(ValueError, match="spacing has no entry for volume 0"):
        bad = VolumeAccumulator(3, spacing={1: (1.0, 1.0, 1.0)})
        bad.update(z, z, [0, 0], [0, 1])
        bad.compute()
    with pytest.raises(ValueError, match="spacing has 2 values for 3-D"):
        VolumeAccumulator(3, spacing=(1.0, 1.0))
