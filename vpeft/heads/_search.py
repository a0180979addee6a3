"""Hyper-parameter grid search for the training-free heads, and the input checks the heads share.

The search scores every point of a grid by top-1 accuracy on a labelled *validation* split and keeps the first best
point in grid order. It is meant for the few-shot validation split of the CoOp protocol (``min(K, 4)`` shots per
class, DESIGN section 6); it must never be given test features, since the point it returns is then selected on test.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["search_hparams"]


# ----------------------------------------------------------------------------------------------------------------
# Input checks shared by TipAdapter, TipAdapterF, GDA and search_hparams.
# ----------------------------------------------------------------------------------------------------------------


def check_number(name: str, value: Any, *, low: float | None = None, strict: bool = False) -> float:
    """``value`` as a finite float; ``TypeError`` if it is not a real number (bools refused), ``ValueError`` if it is
    below ``low`` (or equal to it when ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (v <= low if strict else v < low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value!r}")
    return v



class HyperParameter:
    """A float hyper-parameter of a head, kept in the float64 scalar buffer ``_<name>`` (so it round-trips exactly
    through ``state_dict``) and checked with :func:`check_number` on assignment. The owner registers the buffer."""

    def __init__(self, doc: str, low: float = 0.0, strict: bool = False) -> None:
        self.__doc__, self.low, self.strict = doc, low, strict
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        return float(getattr(obj, "_" + self.name))

    def __set__(self, obj: Any, value: float) -> None:
        getattr(obj, "_" + self.name).fill_(check_number(self.name, value, low=self.low, strict=self.strict))

def check_int(name: str, value: Any, *, low: int) -> int:
    """``value`` as an int >= ``low``; ``TypeError`` for non-integers (bools refused), ``ValueError`` below ``low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return value


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (half and bfloat16 encoder outputs included) is computed in float32."""
    return torch.promote_types(t.dtype, torch.float32)


def check_features(name: str, features: Any, dim: int | None = None) -> torch.Tensor:
    """A non-empty floating ``(N, D)`` tensor whose ``D`` equals ``dim`` when given."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, D), got {type(features).__name__}")
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"{name} must have shape (N, D) with N, D >= 1, got {tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {features.dtype}")
    if dim is not None and features.shape[1] != dim:
        raise ValueError(f"{name} has feature dimension {features.shape[1]}, expected D = {dim} "
                         f"(the first dimension of zs_weights / the head's keys)")
    return features


def normalise_features(features: Any, like: torch.Tensor) -> torch.Tensor:
    """``features`` (N, D) L2-normalised on ``like``'s device and dtype, ``D`` checked against ``like.shape[0]``."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor of shape (N, D), got {type(features).__name__}")
    if features.ndim != 2 or features.shape[1] != like.shape[0]:
        raise ValueError(f"features must have shape (N, {like.shape[0]}), got {tuple(features.shape)}")
    return F.normalize(features.to(device=like.device, dtype=like.dtype), dim=-1)


def check_labels(name: str, labels: Any, n: int, num_classes: int | None) -> torch.Tensor:
    """An integer ``(n,)`` tensor with values in ``[0, num_classes)``, returned as int64."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N,) holding class indices, "
                        f"got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices (e.g. torch.int64), got dtype {labels.dtype}")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match the features, got {tuple(labels.shape)}")
    labels = labels.long()
    if num_classes is not None:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes}) (C = number of columns of zs_weights), "
                             f"got values in [{lo}, {hi}]")
    return labels


def check_zs_weights(zs_weights: Any, dim: int) -> torch.Tensor:
    """A floating ``(D, C)`` zero-shot classifier (open_clip's ``build_zero_shot_classifier`` layout)."""
    if not isinstance(zs_weights, torch.Tensor):
        raise TypeError(f"zs_weights must be a torch.Tensor of shape (D, C), got {type(zs_weights).__name__}")
    if not zs_weights.is_floating_point():
        raise TypeError(f"zs_weights must be a floating-point tensor, got dtype {zs_weights.dtype}")
    if zs_weights.ndim != 2 or zs_weights.shape[1] == 0:
        raise ValueError(f"zs_weights must have shape (D, C) with C >= 1 (columns = class text embeddings, as "
                         f"open_clip.build_zero_shot_classifier returns), got {tuple(zs_weights.shape)}")
    if zs_weights.shape[0] != dim:
        raise ValueError(f"zs_weights has {zs_weights.shape[0]} rows but the features have D = {dim}; zs_weights "
                         f"must be (D, C), i.e. transposed with respect to an nn.Linear weight")
    return zs_weights


# ----------------------------------------------------------------------------------------------------------------
# Grid search.
# ----------------------------------------------------------------------------------------------------------------


def check_grid(grid: Any, allowed: Sequence[str] | None = None) -> dict[str, list[Any]]:
    """A non-empty ``{name: non-empty sequence}`` mapping, copied to lists; names limited to ``allowed`` if given."""
    if not isinstance(grid, Mapping):
        raise TypeError(f"grid must be a dict mapping parameter names to sequences of values, "
                        f"got {type(grid).__name__}")
    if not grid:
        raise ValueError("grid must name at least one parameter")
    out: dict[str, list[Any]] = {}
    for k, vs in grid.items():
        if not isinstance(k, str):
            raise TypeError(f"grid keys must be parameter names (str), got {k!r}")
        if allowed is not None and k not in allowed:
            raise ValueError(f"grid key {k!r} is not searchable here; accepted keys: {sorted(allowed)}")
        if isinstance(vs, (str, bytes)) or not isinstance(vs, Sequence):
            raise TypeError(f"grid[{k!r}] must be a sequence of values (list or tuple), got {type(vs).__name__}")
        if len(vs) == 0:
            raise ValueError(f"grid[{k!r}] is empty; give at least one value")
        out[k] = list(vs)
    return out


def num_correct(logits: torch.Tensor, labels: torch.Tensor) -> int:
    """Top-1 hits; ``argmax`` takes the first maximal class, so exact logit ties resolve to the lower index."""
    return int((logits.argmax(dim=1) == labels).sum())


def grid_search(grid: dict[str, list[Any]], correct: Callable[[dict[str, Any]], int],
                n: int) -> tuple[dict[str, Any], float, list[dict[str, Any]]]:
    """Scan ``itertools.product`` of the grid (first key outermost); ``correct(params)`` counts top-1 hits out of
    ``n``. Comparing integer counts with a strict ``>`` makes the first best point in grid order win, free of
    floating-point noise in the accuracy."""
    keys = list(grid)
    best_params: dict[str, Any] = {}
    best = -1
    table: list[dict[str, Any]] = []
    for values in itertools.product(*(grid[k] for k in keys)):
        params = dict(zip(keys, values))
        hits = correct(params)
        table.append({**params, "acc": hits / n})
        if hits > best:
            best, best_params = hits, params
    return dict(best_params), best / n, table


def search_hparams(build: Callable[..., nn.Module], grid: Mapping[str, Sequence[Any]], val_features: torch.Tensor,
                   val_labels: torch.Tensor) -> tuple[dict[str, Any], float, list[dict[str, Any]]]:
    """Exhaustive grid search of a head's hyper-parameters by top-1 accuracy on a validation split.

    Give it the few-shot **validation** split (in the CoOp protocol ``min(K, 4)`` shots per class drawn from the
    dataset's val split), never the test split: the returned point is chosen by this accuracy, so test features here
    would select on test. Heads fitted on the few-shot training split must likewise not be scored on that split.

    Every point of ``itertools.product`` over the grid values (first key outermost, values in the order given) is
    built with ``build(**params)`` and run on ``val_features`` under ``torch.no_grad``. Ties are broken by grid
    order: the first point reaching the best accuracy wins.

    Args:
        build: Called as ``build(**params)`` for each grid point; returns a module (or any callable) mapping
            ``(N, D)`` features to ``(N, C)`` logits.
        grid: ``{parameter name: sequence of values}``; non-empty, each sequence non-empty.
        val_features: ``(N, D)`` validation features (raw or normalised; the heads normalise them).
        val_labels: ``(N,)`` integer validation labels in ``[0, C)``.

    Returns:
        ``(best_params, best_acc, table)``: the first best point as a dict, its accuracy as a fraction in
        ``[0, 1]``, and one ``{**params, "acc": accuracy}`` row per grid point in search order.

    Raises:
        TypeError: ``build`` is not callable, the grid is not a ``{str: sequence}`` dict, or inputs are not tensors.
        ValueError: empty grid or value list, shape mismatches, labels outside ``[0, C)`` of the built head's logits.
    """
    if not callable(build):
        raise TypeError(f"build must be callable as build(**params) -> head, got {type(build).__name__}")
    grid = check_grid(grid)
    val_features = check_features("val_features", val_features)
    n = val_features.shape[0]
    val_labels = check_labels("val_labels", val_labels, n, None)

    def correct(params: dict[str, Any]) -> int:
        head = build(**params)
        if not callable(head):
            raise TypeError(f"build(**{params!r}) returned {type(head).__name__}, expected a module returning logits")
        with torch.no_grad():
            logits = head(val_features)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != n:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"the head built with {params!r} must return (N, C) logits with N = {n}, got {shape}")
        if int(val_labels.max()) >= logits.shape[1]:
            raise ValueError(f"val_labels must lie in [0, {logits.shape[1]}) (the head's number of classes), "
                             f"got max {int(val_labels.max())}")
        return num_correct(logits, val_labels.to(logits.device))

    if int(val_labels.min()) < 0:
        raise ValueError(f"val_labels must be non-negative class indices, got min {int(val_labels.min())}")
    return grid_search(grid, correct, n)
