"""Evaluation metrics that torchmetrics does not provide (see :mod:`vpeft.metrics.segmentation`)."""

from .segmentation import (
    HausdorffDistance95,
    VolumeAccumulator,
    VolumeScores,
    case_scores,
    dice_score,
    hd95,
    surface_distances,
    surface_mask,
)

__all__ = [
    "HausdorffDistance95",
    "VolumeAccumulator",
    "VolumeScores",
    "case_scores",
    "dice_score",
    "hd95",
    "surface_distances",
    "surface_mask",
]
