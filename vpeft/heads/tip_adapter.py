"""Tip-Adapter and Tip-Adapter-F (Zhang et al., "Tip-Adapter: Training-free CLIP-Adapter for Better Vision-Language
Modeling", arXiv:2111.03930; extended as "Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification",
ECCV 2022, arXiv:2207.09519).

Tip-Adapter turns the few-shot training set into a key-value cache: the keys ``F`` are the L2-normalised image
features of the N training images, the values ``L`` their one-hot labels. A query feature ``f`` (normalised) is
classified by

    A      = exp(-beta * (1 - f F^T))                  (N affinities; 1 - cosine similarity, sharpened by beta)
    logits = logit_scale * f W_zs + alpha * A L        (zero-shot logits + residual ratio alpha * cache logits)

where ``W_zs`` is the ``(D, C)`` zero-shot classifier of L2-normalised class text embeddings (open_clip's
``build_zero_shot_classifier`` layout). Only the zero-shot term carries CLIP's ``logit_scale`` (100); the cache logits
are added unscaled, as in the paper's formula and the authors' code, so ``alpha`` is the ratio in that convention.
Nothing is trained: ``TipAdapter.fit`` only builds the cache.

Tip-Adapter-F makes the keys learnable (an ``(N, D)`` ``nn.Parameter`` initialised from the cache; values, the
zero-shot classifier, alpha and beta stay fixed) and fine-tunes them with cross-entropy on the same few-shot training
features. At initialisation it computes exactly Tip-Adapter's logits.

Paper defaults used here:
    * Cache logits ``alpha * exp(-beta (1 - f F^T)) L`` added to ``100 * f W_zs`` (method section; the factor 100 is
      CLIP's logit scale, explicit in the reference code).
    * ``alpha = beta = 1`` before search (the reference configs' ``init_beta: 1``; ``init_alpha`` is 1.17 or 2 per
      dataset there).
    * Search on the validation split over the reference grid ``beta in {0.1 + i (7 - 0.1) / 200 : i < 200}`` and
      ``alpha in {0.1 + i (3 - 0.1) / 20 : i < 20}`` (the ImageNet / OxfordPets ranges ``search_scale: [7, 3]``,
      ``search_step: [200, 20]``; other datasets widen the ranges, pass ``grid=`` for those), beta outermost.
    * Tip-Adapter-F: AdamW with ``lr = 1e-3``, ``eps = 1e-4`` (torch's default weight decay 0.01), cosine annealing
      over all iterations, batch size 256, 20 epochs (ImageNet; 100 for EuroSAT in the reference configs), trained
      with the initial alpha/beta, then alpha/beta searched on the validation split with the trained keys.

Deviations from the reference implementation (gaopengcuhk/Tip-Adapter):
    * Features are inputs. The reference builds keys from the mean of 10 randomly augmented views per training image
      and fine-tunes on freshly augmented views every epoch; here the keys are the features given to ``fit`` and
      Tip-Adapter-F trains on those fixed features. Pass view-averaged features to reproduce the cache exactly.
    * Tip-Adapter-F trains for exactly ``epochs`` epochs and keeps the final keys. The reference evaluates on the
      test set after every epoch and keeps the best epoch's keys, which selects on test; vpeft never does.
    * The hyper-parameter search is only ever given the validation split (DESIGN section 6). The reference ImageNet
      script searches alpha/beta on the test features (ImageNet has no val split in the CoOp protocol).
    * Heads compute in float32 (float64 inputs stay float64); the reference keeps CLIP's float16 on GPU.
    * The search keeps the first best point in grid order, comparing integer hit counts; the reference also keeps the
      first best (strict ``>``) but compares float percentages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._search import (
    HyperParameter,
    check_features,
    check_grid,
    check_int,
    check_labels,
    check_number,
    check_zs_weights,
    compute_dtype,
    grid_search,
    normalise_features,
    num_correct,
)

__all__ = ["TipAdapter", "TipAdapterF", "DEFAULT_GRID"]


def _reference_range(scale: float, steps: int) -> list[float]:
    # The reference code's search list: `steps` points from 0.1 (inclusive) towards `scale` (exclusive).
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


#: Default ``search`` grid: the reference ImageNet / OxfordPets ranges, beta outermost as in the reference loop.
DEFAULT_GRID: dict[str, list[float]] = {"beta": _reference_range(7.0, 200), "alpha": _reference_range(3.0, 20)}


def _cache_logits(affinity: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """``exp(-beta (1 - affinity)) @ values``; shared by ``forward`` and ``search`` so both compute identical logits."""
    return torch.exp(-beta * (1.0 - affinity)) @ values


class TipAdapter(nn.Module):
    """Training-free Tip-Adapter head on pooled CLIP image features.

    Build it with :meth:`fit` (or :meth:`search`); the constructor takes an already built cache and is what
    ``load_state_dict`` needs (tensors of the right shapes, e.g. zeros; alpha, beta and logit_scale are buffers and
    round-trip through the state dict).

    Args:
        cache_keys: ``(N, D)`` L2-normalised training features (a buffer here, an ``nn.Parameter`` in TipAdapterF).
        cache_values: ``(N, C)`` one-hot training labels.
        zs_weights: ``(D, C)`` zero-shot classifier, columns = L2-normalised class text embeddings; used as given.
        alpha: Residual ratio of the cache logits, ``>= 0``.
        beta: Sharpness of the affinities, ``> 0``.
        logit_scale: Multiplier of the zero-shot logits (CLIP's 100), ``>= 0``.
    """

    _trainable_keys = False

    def __init__(self, cache_keys: torch.Tensor, cache_values: torch.Tensor, zs_weights: torch.Tensor,
                 alpha: float = 1.0, beta: float = 1.0, logit_scale: float = 100.0) -> None:
        super().__init__()
        cache_keys = check_features("cache_keys", cache_keys)
        n, d = cache_keys.shape
        zs_weights = check_zs_weights(zs_weights, d)
        c = zs_weights.shape[1]
        if not isinstance(cache_values, torch.Tensor):
            raise TypeError(f"cache_values must be a torch.Tensor of shape (N, C), got {type(cache_values).__name__}")
        if cache_values.shape != (n, c):
            raise ValueError(f"cache_values must have shape (N, C) = ({n}, {c}) to match cache_keys and zs_weights, "
                             f"got {tuple(cache_values.shape)}")
        dtype = compute_dtype(cache_keys)
        keys = cache_keys.detach().to(dtype).clone()
        if self._trainable_keys:
            self.cache_keys = nn.Parameter(keys)
        else:
            self.register_buffer("cache_keys", keys)
        self.register_buffer("cache_values", cache_values.detach().to(device=keys.device, dtype=dtype).clone())
        self.register_buffer("zs_weights", zs_weights.detach().to(device=keys.device, dtype=dtype).clone())
        # float64 scalars so the Python floats round-trip exactly through the state dict.
        for name in ("_alpha", "_beta", "_logit_scale"):
            self.register_buffer(name, torch.zeros((), dtype=torch.float64, device=keys.device))
        self.alpha, self.beta, self.logit_scale = alpha, beta, logit_scale

    # -- hyper-parameters --------------------------------------------------------------------------------------------

    alpha = HyperParameter("Residual ratio of the cache logits.")
    beta = HyperParameter("Sharpness of the affinities ``exp(-beta (1 - cos))``.", strict=True)
    logit_scale = HyperParameter("Multiplier of the zero-shot logits.")

    @property
    def num_classes(self) -> int:
        """C, the number of classes."""
        return self.zs_weights.shape[1]

    # -- construction ------------------------------------------------------------------------------------------------

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, zs_weights: torch.Tensor, alpha: float = 1.0,
            beta: float = 1.0, logit_scale: float = 100.0) -> TipAdapter:
        """Build the cache from the few-shot training split (closed form, no training).

        Args:
            features: ``(N, D)`` training image features, raw ``encode_image`` output or normalised.
            labels: ``(N,)`` integer labels in ``[0, C)``.
            zs_weights: ``(D, C)`` zero-shot classifier.
            alpha: Residual ratio, ``>= 0``.
            beta: Sharpness, ``> 0``.
            logit_scale: Zero-shot logit multiplier, ``>= 0``.

        Returns:
            The head, keys = normalised ``features``, values = ``one_hot(labels, C)``.

        Raises:
            TypeError: Non-tensor inputs, non-float features, non-integer labels, non-numeric hyper-parameters.
            ValueError: Shape mismatches, labels outside ``[0, C)``, ``alpha < 0``, ``beta <= 0``.
        """
        features = check_features("features", features)
        zs_weights = check_zs_weights(zs_weights, features.shape[1])
        labels = check_labels("labels", labels, features.shape[0], zs_weights.shape[1])
        with torch.no_grad():
            keys = F.normalize(features.to(compute_dtype(features)), dim=-1)
            values = F.one_hot(labels.to(keys.device), zs_weights.shape[1]).to(keys.dtype)
        return cls(keys, values, zs_weights, alpha=alpha, beta=beta, logit_scale=logit_scale)

    @classmethod
    def search(cls, train_features: torch.Tensor, train_labels: torch.Tensor, zs_weights: torch.Tensor,
               val_features: torch.Tensor, val_labels: torch.Tensor,
               grid: Optional[Mapping[str, Sequence[float]]] = None, logit_scale: float = 100.0,
               **fit_kwargs: Any) -> TipAdapter:
        """Fit on the few-shot training split, then pick alpha and beta by accuracy on the validation split.

        ``val_features`` must be the few-shot validation split, never test (see
        :func:`vpeft.heads.search_hparams`). The cache is built once (for TipAdapterF: trained once, with the
        initial alpha/beta, as in the reference); the validation affinities are computed once and each beta's
        cache logits once, so only ``alpha * cache + zero-shot`` is redone per grid point. Ties go to the first best
        point in grid order.

        Args:
            train_features: ``(N, D)`` few-shot training features.
            train_labels: ``(N,)`` training labels.
            zs_weights: ``(D, C)`` zero-shot classifier.
            val_features: ``(M, D)`` few-shot validation features.
            val_labels: ``(M,)`` validation labels.
            grid: ``{"alpha": [...], "beta": [...]}`` (either key may be left out: it then stays at its fitted
                value); ``None`` uses :data:`DEFAULT_GRID`.
            logit_scale: Zero-shot logit multiplier.
            **fit_kwargs: Passed to :meth:`fit` (e.g. TipAdapterF's ``epochs``, ``lr``, ``seed``, or the initial
                ``alpha``/``beta``).

        Returns:
            The fitted head set to the best alpha/beta; its ``search_result`` attribute holds
            ``{"best_params", "best_acc", "table"}`` as returned by :func:`vpeft.heads.search_hparams`.
        """
        grid = check_grid(DEFAULT_GRID if grid is None else grid, allowed=("alpha", "beta"))
        for v in grid.get("alpha", []):
            check_number("grid['alpha'] value", v, low=0.0)
        for v in grid.get("beta", []):
            check_number("grid['beta'] value", v, low=0.0, strict=True)
        head = cls.fit(train_features, train_labels, zs_weights, logit_scale=logit_scale, **fit_kwargs)
        val_features = check_features("val_features", val_features, head.cache_keys.shape[1])
        val_labels = check_labels("val_labels", val_labels, val_features.shape[0], head.num_classes)

        with torch.no_grad():
            f = head._normalise(val_features)
            zs_logits = head.logit_scale * (f @ head.zs_weights)
            affinity = f @ head.cache_keys.T
            val_labels = val_labels.to(f.device)
            memo: dict[str, Any] = {"beta": None, "cache": None}

            def correct(params: dict[str, Any]) -> int:
                beta = float(params.get("beta", head.beta))
                alpha = float(params.get("alpha", head.alpha))
                # The default grid has beta outermost, so one memo entry computes each beta's cache logits once.
                if memo["beta"] != beta:
                    memo["beta"], memo["cache"] = beta, _cache_logits(affinity, head.cache_values, beta)
                return num_correct(zs_logits + alpha * memo["cache"], val_labels)

            best_params, best_acc, table = grid_search(grid, correct, f.shape[0])
        for name, value in best_params.items():
            setattr(head, name, value)
        head.search_result = {"best_params": best_params, "best_acc": best_acc, "table": table}
        return head

    # -- forward -----------------------------------------------------------------------------------------------------

    def _normalise(self, features: torch.Tensor) -> torch.Tensor:
        return normalise_features(features, self.zs_weights)

    def _logits_normalised(self, f: torch.Tensor) -> torch.Tensor:
        zs_logits = self.logit_scale * (f @ self.zs_weights)
        return zs_logits + self.alpha * _cache_logits(f @ self.cache_keys.T, self.cache_values, self.beta)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` image features (normalised here) -> ``(N, C)`` logits."""
        return self._logits_normalised(self._normalise(features))

    def extra_repr(self) -> str:  # noqa: D102
        n, d = self.cache_keys.shape
        return (f"cache={n}, dim={d}, classes={self.num_classes}, alpha={self.alpha:g}, beta={self.beta:g}, "
                f"logit_scale={self.logit_scale:g}")


class TipAdapterF(TipAdapter):
    """Tip-Adapter-F: Tip-Adapter whose cache keys are an ``nn.Parameter`` fine-tuned on the few-shot training split.

    The constructor, ``forward`` and ``search`` are Tip-Adapter's; with untouched keys the logits are identical.
    """

    _trainable_keys = True

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, zs_weights: torch.Tensor, alpha: float = 1.0,
            beta: float = 1.0, logit_scale: float = 100.0, epochs: int = 20, lr: float = 1e-3,
            batch_size: int = 256, seed: int = 0) -> TipAdapterF:
        """Build the cache, then fine-tune the keys with cross-entropy on the same training features.

        AdamW (``eps = 1e-4`` as in the reference, torch's default weight decay) with cosine annealing to 0 over
        ``epochs * ceil(N / batch_size)`` steps, mini-batches reshuffled every epoch. The shuffling uses a private
        ``torch.Generator`` seeded with ``seed``, so the result depends only on the inputs and ``seed`` and the global
        RNG is left alone.

        Args:
            features: ``(N, D)`` few-shot training features.
            labels: ``(N,)`` training labels.
            zs_weights: ``(D, C)`` zero-shot classifier.
            alpha: Residual ratio used in training (and kept unless :meth:`search` replaces it).
            beta: Sharpness used in training.
            logit_scale: Zero-shot logit multiplier.
            epochs: Passes over the training features; 0 returns the untrained (Tip-Adapter-equivalent) head.
            lr: Peak learning rate.
            batch_size: Mini-batch size.
            seed: Seed of the mini-batch shuffling.

        Returns:
            The fine-tuned head (keys trained; values, zero-shot weights, alpha, beta unchanged).
        """
        epochs = check_int("epochs", epochs, low=0)
        lr = check_number("lr", lr, low=0.0, strict=True)
        batch_size = check_int("batch_size", batch_size, low=1)
        seed = check_int("seed", seed, low=0)
        head = super().fit(features, labels, zs_weights, alpha=alpha, beta=beta, logit_scale=logit_scale)
        with torch.no_grad():
            f = head._normalise(features)
        y = labels.long().to(f.device)
        head._train_keys(f, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
        return head

    def _train_keys(self, f: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch_size: int,
                    seed: int) -> None:
        if epochs == 0:
            return
        n = f.shape[0]
        steps = epochs * math.ceil(n / batch_size)
        optimizer = torch.optim.AdamW([self.cache_keys], lr=lr, eps=1e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        generator = torch.Generator().manual_seed(seed)
        was_training = self.training
        self.train()
        # fit may be called under no_grad (e.g. inside an evaluation loop); training needs autograd regardless.
        with torch.enable_grad():
            for _ in range(epochs):
                order = torch.randperm(n, generator=generator).to(f.device)
                for start in range(0, n, batch_size):
                    idx = order[start:start + batch_size]
                    loss = F.cross_entropy(self._logits_normalised(f[idx]), y[idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
        self.train(was_training)
