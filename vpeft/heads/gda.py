"""GDA: Gaussian discriminant analysis on CLIP image features, ensembled with the zero-shot classifier (Wang et al.,
"A Hard-to-Beat Baseline for Training-free CLIP-based Adaptation", ICLR 2024, arXiv:2402.04087).

Each class ``k`` is modelled as a Gaussian ``N(mu_k, Sigma)`` over L2-normalised image features with one covariance
shared by all classes. Bayes' rule then gives a linear classifier

    w_k = Sigma^-1 mu_k,        b_k = log pi_k - 1/2 mu_k^T Sigma^-1 mu_k,

and the head ensembles it with CLIP's zero-shot classifier ``W_zs`` (``(D, C)``, columns = L2-normalised class text
embeddings, open_clip's ``build_zero_shot_classifier`` layout):

    logits = logit_scale * f W_zs + alpha * (f W + b).

Estimation (closed form, no training): ``mu_k`` is the empirical class mean; the precision matrix ``Sigma^-1`` is the
paper's empirical-Bayes ridge-type estimator (Kubokawa & Srivastava, 2008), which stays well defined when there are
fewer samples than dimensions (few-shot: N = K * C against D = 512..1024):

    Sigma^-1 = D * ((N - 1) S + tr(S) I_D)^-1,      S = 1/(N - 1) sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T,

with N the total number of training samples (``shrinkage="empirical_bayes"``, the default). Because the features are
normalised, the scale of this estimate, and hence of ``W``/``b``, is what the paper's alpha grid is calibrated on.

As an extension, ``shrinkage=lam`` (a float in ``[0, 1]``) uses the pooled maximum-likelihood covariance
``Sigma_ml = 1/N sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T`` shrunk towards a scaled identity,
``Sigma = (1 - lam) Sigma_ml + lam tr(Sigma_ml) / D I``. This is scikit-learn's ``LinearDiscriminantAnalysis``
``shrinkage`` convention: with equal class sizes and uniform priors the GDA logits equal sklearn's
``decision_function`` (``shrinkage=0.0`` is plain LDA). The empirical-Bayes precision is the inverse of this
estimate for ``lam = D / (N - 1 + D)``, multiplied by ``(N - 1) D / (N (N - 1 + D))``.

Paper defaults used here:
    * Uniform class prior ``pi_k = 1 / C`` (the reference code's ``ps``; the few-shot splits are class-balanced).
    * The empirical-Bayes precision estimator above (the paper's precision-matrix equation; same form in the code).
    * Zero-shot logits scaled by CLIP's 100, GDA logits by ``alpha``; ``alpha`` searched on the validation split over
      ``{1e-4, 1e-3, 1e-2, 0.1, 1, 10, 100}`` (the reference code's grid).

Deviations from the reference implementation (mrflogs/ICLR24):
    * Features are inputs. The reference estimates means and covariance from 10 randomly augmented views of each
      training image (``augment_epoch``); pass such features to reproduce it. Without augmentation a 1-shot split has
      no within-class variation (``S = 0``): the reference's ``pinv`` then gives a zero precision, i.e. a constant GDA
      term and zero-shot predictions; vpeft returns the same zero classifier and warns.
    * The precision is computed with a Cholesky solve in float64 (the matrix is positive definite whenever
      ``tr(S) > 0``) instead of ``pinv`` in float32, then stored in the head's dtype.
    * alpha is only ever searched on the validation split (DESIGN section 6); the reference ImageNet script searches
      it on the test features.
    * The float ``shrinkage`` option is an addition for comparison with LDA; the paper uses only the estimator above.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._search import (
    HyperParameter,
    check_features,
    check_grid,
    check_labels,
    check_number,
    check_zs_weights,
    compute_dtype,
    grid_search,
    normalise_features,
    num_correct,
)

__all__ = ["GDA", "DEFAULT_GRID", "gda_classifier"]

#: Default ``search`` grid: the reference code's alpha list.
DEFAULT_GRID: dict[str, list[float]] = {"alpha": [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]}

Shrinkage = Union[str, float]


def _check_shrinkage(shrinkage: Any) -> Shrinkage:
    if isinstance(shrinkage, str):
        if shrinkage != "empirical_bayes":
            raise ValueError(f"shrinkage must be 'empirical_bayes' or a float in [0, 1], got {shrinkage!r}")
        return shrinkage
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)):
        raise TypeError(f"shrinkage must be 'empirical_bayes' or a float in [0, 1], got {type(shrinkage).__name__}")
    lam = float(shrinkage)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"shrinkage must be 'empirical_bayes' or a float in [0, 1], got {shrinkage!r}")
    return lam


def gda_classifier(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   shrinkage: Shrinkage = "empirical_bayes") -> tuple[torch.Tensor, torch.Tensor]:
    """The GDA linear classifier ``(W, b)`` of already normalised features, in float64.

    Args:
        features: ``(N, D)`` features (used as given; the GDA head normalises before calling this).
        labels: ``(N,)`` int64 labels in ``[0, num_classes)``; every class must occur.
        num_classes: C.
        shrinkage: ``"empirical_bayes"`` (paper) or a float in ``[0, 1]`` (sklearn-style shrunk pooled covariance).

    Returns:
        ``W`` of shape ``(D, C)`` (column k = ``Sigma^-1 mu_k``) and ``b`` of shape ``(C,)``, uniform prior.

    Raises:
        ValueError: A class without samples, fewer than 2 samples for the empirical-Bayes estimator, or a singular
            covariance for a float ``shrinkage``.
    """
    shrinkage = _check_shrinkage(shrinkage)
    x = features.detach().to(torch.float64)
    n, d = x.shape
    counts = torch.bincount(labels, minlength=num_classes)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        raise ValueError(f"labels has no sample for class(es) {shown}; GDA needs at least one sample of every one of "
                         f"the C = {num_classes} classes (columns of zs_weights) to estimate its mean")
    means = torch.zeros(num_classes, d, dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    means /= counts.unsqueeze(1).to(x.dtype)
    centred = x - means[labels]
    scatter = centred.T @ centred  # sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T
    trace = float(torch.trace(scatter))
    eye = torch.eye(d, dtype=x.dtype, device=x.device)

    if shrinkage == "empirical_bayes":
        if n < 2:
            raise ValueError(f"the empirical-Bayes precision estimator needs N >= 2 training samples, got N = {n}")
        if trace == 0.0:
            warnings.warn("GDA: the training features have no within-class variation (e.g. 1 shot per class without "
                          "augmented views), so the precision estimate is zero and the GDA term is constant; the "
                          "head predicts like the zero-shot classifier. Pass several augmented views per image.")
            weight = torch.zeros(d, num_classes, dtype=x.dtype, device=x.device)
        else:
            # D ((N-1) S + tr(S) I)^-1 with S = scatter / (N-1): positive definite because tr(S) > 0.
            chol = torch.linalg.cholesky(scatter + (trace / (n - 1)) * eye)
            weight = d * torch.cholesky_solve(means.T.contiguous(), chol)
    else:
        lam = shrinkage
        cov = (1.0 - lam) * scatter / n + (lam * trace / (n * d)) * eye
        chol, info = torch.linalg.cholesky_ex(cov)
        if int(info) != 0:
            raise ValueError(f"the pooled covariance is singular with shrinkage={lam} (N = {n} samples, C = "
                             f"{num_classes} classes, D = {d}); use shrinkage='empirical_bayes' or a float > 0")
        weight = torch.cholesky_solve(means.T.contiguous(), chol)
    bias = math.log(1.0 / num_classes) - 0.5 * (means.T * weight).sum(dim=0)
    return weight, bias


class GDA(nn.Module):
    """Training-free GDA head ensembled with the zero-shot classifier.

    Build it with :meth:`fit` (or :meth:`search`); the constructor takes a ready classifier and is what
    ``load_state_dict`` needs (tensors of the right shapes; alpha and logit_scale are buffers and round-trip).

    Args:
        gda_weight: ``(D, C)`` GDA weights, column k = ``Sigma^-1 mu_k``.
        gda_bias: ``(C,)`` GDA biases.
        zs_weights: ``(D, C)`` zero-shot classifier, columns = L2-normalised class text embeddings; used as given.
        alpha: Weight of the GDA logits, ``>= 0``.
        logit_scale: Multiplier of the zero-shot logits (CLIP's 100), ``>= 0``.
    """

    def __init__(self, gda_weight: torch.Tensor, gda_bias: torch.Tensor, zs_weights: torch.Tensor,
                 alpha: float = 1.0, logit_scale: float = 100.0) -> None:
        super().__init__()
        if not isinstance(gda_weight, torch.Tensor) or not gda_weight.is_floating_point() or gda_weight.ndim != 2:
            raise TypeError("gda_weight must be a floating-point torch.Tensor of shape (D, C)")
        zs_weights = check_zs_weights(zs_weights, gda_weight.shape[0])
        if gda_weight.shape != zs_weights.shape:
            raise ValueError(f"gda_weight must have the shape of zs_weights {tuple(zs_weights.shape)}, "
                             f"got {tuple(gda_weight.shape)}")
        if not isinstance(gda_bias, torch.Tensor) or gda_bias.shape != (zs_weights.shape[1],):
            raise ValueError(f"gda_bias must be a tensor of shape ({zs_weights.shape[1]},)")
        dtype = compute_dtype(zs_weights)
        dev = zs_weights.device
        self.register_buffer("gda_weight", gda_weight.detach().to(device=dev, dtype=dtype).clone())
        self.register_buffer("gda_bias", gda_bias.detach().to(device=dev, dtype=dtype).clone())
        self.register_buffer("zs_weights", zs_weights.detach().to(dtype=dtype).clone())
        # float64 scalars so the Python floats round-trip exactly through the state dict.
        self.register_buffer("_alpha", torch.zeros((), dtype=torch.float64, device=dev))
        self.register_buffer("_logit_scale", torch.zeros((), dtype=torch.float64, device=dev))
        self.alpha, self.logit_scale = alpha, logit_scale

    alpha = HyperParameter("Weight of the GDA logits in the ensemble.")
    logit_scale = HyperParameter("Multiplier of the zero-shot logits.")

    @property
    def num_classes(self) -> int:
        """C, the number of classes."""
        return self.zs_weights.shape[1]

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, zs_weights: torch.Tensor, alpha: float = 1.0,
            shrinkage: Shrinkage = "empirical_bayes", logit_scale: float = 100.0) -> GDA:
        """Estimate class means and the shared precision on the few-shot training split (closed form).

        Args:
            features: ``(N, D)`` training image features, raw ``encode_image`` output or normalised.
            labels: ``(N,)`` integer labels in ``[0, C)``, every class present.
            zs_weights: ``(D, C)`` zero-shot classifier.
            alpha: Weight of the GDA logits, ``>= 0`` (the paper searches it; see :meth:`search`).
            shrinkage: ``"empirical_bayes"`` (the paper's estimator) or a float in ``[0, 1]`` (shrunk pooled ML
                covariance, sklearn's LDA convention).
            logit_scale: Zero-shot logit multiplier.

        Returns:
            The head.

        Raises:
            TypeError: Non-tensor inputs, non-float features, non-integer labels, bad hyper-parameter types.
            ValueError: Shape mismatches, labels outside ``[0, C)``, a class without samples, a singular covariance
                for a float ``shrinkage``, out-of-range hyper-parameters.
        """
        features = check_features("features", features)
        zs_weights = check_zs_weights(zs_weights, features.shape[1])
        labels = check_labels("labels", labels, features.shape[0], zs_weights.shape[1])
        check_number("alpha", alpha, low=0.0)
        check_number("logit_scale", logit_scale, low=0.0)
        shrinkage = _check_shrinkage(shrinkage)
        with torch.no_grad():
            f = F.normalize(features.to(compute_dtype(features)), dim=-1)
            weight, bias = gda_classifier(f, labels.to(f.device), zs_weights.shape[1], shrinkage)
        zs_weights = zs_weights.to(device=f.device, dtype=f.dtype)
        return cls(weight.to(f.dtype), bias.to(f.dtype), zs_weights, alpha=alpha, logit_scale=logit_scale)

    @classmethod
    def search(cls, train_features: torch.Tensor, train_labels: torch.Tensor, zs_weights: torch.Tensor,
               val_features: torch.Tensor, val_labels: torch.Tensor,
               grid: Optional[Mapping[str, Sequence[Any]]] = None, logit_scale: float = 100.0,
               shrinkage: Shrinkage = "empirical_bayes") -> GDA:
        """Fit on the few-shot training split, then pick alpha (and optionally shrinkage) on the validation split.

        ``val_features`` must be the few-shot validation split, never test (see :func:`vpeft.heads.search_hparams`).
        The classifier is estimated once per shrinkage value and the validation zero-shot and GDA logits once per
        estimate, so each alpha costs one addition. Ties go to the first best point in grid order.

        Args:
            train_features: ``(N, D)`` few-shot training features.
            train_labels: ``(N,)`` training labels.
            zs_weights: ``(D, C)`` zero-shot classifier.
            val_features: ``(M, D)`` few-shot validation features.
            val_labels: ``(M,)`` validation labels.
            grid: ``{"alpha": [...]}``, optionally with ``"shrinkage": [...]``; ``None`` uses :data:`DEFAULT_GRID`.
                A key left out stays at ``fit``'s default (alpha 1) or at ``shrinkage``.
            logit_scale: Zero-shot logit multiplier.
            shrinkage: Estimator used when the grid does not search ``"shrinkage"``.

        Returns:
            The head fitted with the best point; its ``search_result`` attribute holds
            ``{"best_params", "best_acc", "table"}`` as returned by :func:`vpeft.heads.search_hparams`.
        """
        grid = check_grid(DEFAULT_GRID if grid is None else grid, allowed=("alpha", "shrinkage"))
        for v in grid.get("alpha", []):
            check_number("grid['alpha'] value", v, low=0.0)
        for v in grid.get("shrinkage", []):
            _check_shrinkage(v)
        shrinkage = _check_shrinkage(shrinkage)
        head = cls.fit(train_features, train_labels, zs_weights, shrinkage=shrinkage, logit_scale=logit_scale)
        val_features = check_features("val_features", val_features, head.zs_weights.shape[0])
        val_labels = check_labels("val_labels", val_labels, val_features.shape[0], head.num_classes)

        with torch.no_grad():
            f = head._normalise(val_features)
            val_labels = val_labels.to(f.device)
            zs_logits = head.logit_scale * (f @ head.zs_weights)
            fitted: dict[Any, GDA] = {shrinkage: head}
            gda_logits: dict[Any, torch.Tensor] = {}

            def correct(params: dict[str, Any]) -> int:
                s = params.get("shrinkage", shrinkage)
                if s not in fitted:
                    fitted[s] = cls.fit(train_features, train_labels, zs_weights, shrinkage=s,
                                        logit_scale=logit_scale)
                if s not in gda_logits:
                    gda_logits[s] = fitted[s]._gda_logits(f)
                return num_correct(zs_logits + float(params.get("alpha", head.alpha)) * gda_logits[s], val_labels)

            best_params, best_acc, table = grid_search(grid, correct, f.shape[0])
        best = fitted[best_params.get("shrinkage", shrinkage)]
        if "alpha" in best_params:
            best.alpha = best_params["alpha"]
        best.search_result = {"best_params": best_params, "best_acc": best_acc, "table": table}
        return best

    def _normalise(self, features: torch.Tensor) -> torch.Tensor:
        return normalise_features(features, self.zs_weights)

    def _gda_logits(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.gda_weight + self.gda_bias

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` image features (normalised here) -> ``(N, C)`` logits."""
        f = self._normalise(features)
        return self.logit_scale * (f @ self.zs_weights) + self.alpha * self._gda_logits(f)

    def extra_repr(self) -> str:  # noqa: D102
        d, c = self.zs_weights.shape
        return f"dim={d}, classes={c}, alpha={self.alpha:g}, logit_scale={self.logit_scale:g}"
