"""Time of SAMed's per-volume scoring (``vpeft.metrics``): HD95 and ``case_scores`` on CT-sized volumes.

Usage::

    python -m benchmarks.segmentation_metrics [--depth 100] [--size 512] [--repeats 3] [--json out.json]

Setup: a ``depth x size x size`` volume holding two ellipsoidal "organs" (class 1, about 20% of the field of view
wide, and a small box-shaped class 2 near a corner); the prediction shifts and rescales them by a few voxels (so
the HD95 is a few voxels, as for a good organ segmentation). Measured (median of ``--repeats``, wall clock, one
process): ``hd95`` of class 1 alone, and ``case_scores`` over both classes (Dice + HD95 each), which is what
``VolumeAccumulator.compute`` runs per test volume. Printed as one JSON row; the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def volumes(depth: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(pred, gt)`` int64 label volumes (see the module doc)."""
    zz, yy, xx = np.ogrid[:depth, :size, :size]
    c = size / 512
    gt = (((zz - depth / 2) / (0.3 * depth)) ** 2 + ((yy - 250 * c) / (80 * c)) ** 2
          + ((xx - 260 * c) / (90 * c)) ** 2 <= 1).astype(np.int64)
    pred = (((zz - depth / 2 - 2) / (0.29 * depth)) ** 2 + ((yy - 255 * c) / (78 * c)) ** 2
            + ((xx - 250 * c) / (95 * c)) ** 2 <= 1).astype(np.int64)
    gt[(zz < depth // 5) & (yy < 60 * c) & (xx < 60 * c)] = 2
    pred[(zz < depth // 5 + 2) & (yy < 58 * c) & (xx < 62 * c)] = 2
    return pred, gt


def _median_seconds(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main(argv=None) -> dict:
    from vpeft.metrics import case_scores, hd95

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=100)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    pred, gt = volumes(args.depth, args.size)
    t_hd, value = _median_seconds(lambda: hd95(pred == 1, gt == 1), args.repeats)
    t_case, (dice, hd) = _median_seconds(lambda: case_scores(pred, gt, 3), args.repeats)
    row = {"shape": [args.depth, args.size, args.size], "hd95_class1_voxels": round(float(value), 4),
           "hd95_seconds": round(t_hd, 3), "case_scores_seconds": round(t_case, 3),
           "dice": [round(float(d), 4) for d in dice], "hd95": [round(float(h), 4) for h in hd]}
    print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
    return row


if __name__ == "__main__":
    main()
