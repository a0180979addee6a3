"""GDA: hand-computed means / covariance / precision on a 2-D example, agreement with scikit-learn's LDA where the
estimators coincide, the empirical-Bayes estimator in the few-shot regime (N < D), the zero-shot ensemble, the
validation-split search, and input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vpeft.heads import GDA, search_hparams

# Two classes, two samples each, written unnormalised; normalised they are
#   class 0: (1, 0), (0.8, 0.6)        class 1: (0, 1), (0.6, 0.8)
X_HAND = torch.tensor([[5.0, 0.0], [8.0, 6.0], [0.0, 2.0], [0.6, 0.8]], dtype=torch.float64)
Y_HAND = torch.tensor([0, 0, 1, 1])
ZS_HAND = torch.tensor([[0.8, 0.6], [0.6, 0.8]], dtype=torch.float64)  # columns: class text embeddings
MU = [(0.9, 0.3), (0.3, 0.9)]
# Deviations from the class means: +-(0.1, -0.3) in class 0, +-(-0.3, 0.1) in class 1, so the scatter is
#   S = 2 [[0.01, -0.03], [-0.03, 0.09]] + 2 [[0.09, -0.03], [-0.03, 0.01]] = [[0.2, -0.12], [-0.12, 0.2]].
S = ((0.2, -0.12), (-0.12, 0.2))


def _inv2(m):
    (a, b), (c, d) = m
    det = a * d - b * c
    return ((d / det, -b / det), (-c / det, a / det))


def _matvec(m, v):
    return tuple(m[i][0] * v[0] + m[i][1] * v[1] for i in range(2))


def _expected_classifier(precision):
    w = [_matvec(precision, mu) for mu in MU]
    b = [math.log(0.5) - 0.5 * (mu[0] * wk[0] + mu[1] * wk[1]) for mu, wk in zip(MU, w)]
    return torch.tensor(w, dtype=torch.float64).T, torch.tensor(b, dtype=torch.float64)


def test_hand_computed_empirical_bayes():
    # N = 4, D = 2, tr(S) = 0.4: precision = D (S + tr(S)/(N-1) I)^-1 = 2 (S + 0.4/3 I)^-1
    #                                     = 2 [[1/3, -0.12], [-0.12, 1/3]]^-1
    m = ((S[0][0] + 0.4 / 3, S[0][1]), (S[1][0], S[1][1] + 0.4 / 3))
    inv = _inv2(m)
    precision = tuple(tuple(2 * v for v in row) for row in inv)
    w, b = _expected_classifier(precision)
    head = GDA.fit(X_HAND, Y_HAND, ZS_HAND, alpha=0.5)
    torch.testing.assert_close(head.gda_weight, w)
    torch.testing.assert_close(head.gda_bias, b)

    q = torch.tensor([[3.0, 4.0]], dtype=torch.float64)  # normalised (0.6, 0.8)
    zs = [0.6 * 0.8 + 0.8 * 0.6, 0.6 * 0.6 + 0.8 * 0.8]
    gda = [0.6 * w[0, k].item() + 0.8 * w[1, k].item() + b[k].item() for k in range(2)]
    expected = torch.tensor([[100 * zs[k] + 0.5 * gda[k] for k in range(2)]], dtype=torch.float64)
    torch.testing.assert_close(head(q), expected)


def test_hand_computed_plain_lda():
    # shrinkage=0: Sigma = S / N = [[0.05, -0.03], [-0.03, 0.05]], det 0.0016, inverse [[31.25, 18.75], [18.75, 31.25]]
    # W_0 = (31.25*0.9 + 18.75*0.3, 18.75*0.9 + 31.25*0.3) = (33.75, 26.25), W_1 = (26.25, 33.75) by symmetry,
    # b_k = log(1/2) - 1/2 (0.9*33.75 + 0.3*26.25) = log(1/2) - 19.125.
    head = GDA.fit(X_HAND, Y_HAND, ZS_HAND, shrinkage=0.0)
    torch.testing.assert_close(head.gda_weight, torch.tensor([[33.75, 26.25], [26.25, 33.75]], dtype=torch.float64))
    torch.testing.assert_close(head.gda_bias, torch.full((2,), math.log(0.5) - 19.125, dtype=torch.float64))


def _gaussian_data(seed=0, c=3, d=5, k=20, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.arange(c).repeat_interleave(k)
    x = means[y] + scale * torch.randn(len(y), d, generator=g, dtype=torch.float64)
    zs = F.normalize(torch.randn(d, c, generator=g, dtype=torch.float64), dim=0)
    return x, y, zs


@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_matches_sklearn_lda(lam):
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    x, y, zs = _gaussian_data()
    c = zs.shape[1]
    xn = F.normalize(x, dim=-1).numpy()  # the head normalises; sklearn gets the normalised features
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=None if lam == 0.0 else lam, priors=np.full(c, 1 / c))
    ref = lda.fit(xn, y.numpy()).decision_function(xn)
    head = GDA.fit(x, y, zs, shrinkage=lam)
    torch.testing.assert_close(head._gda_logits(torch.from_numpy(xn)), torch.from_numpy(ref), rtol=1e-9, atol=1e-9)


def test_empirical_bayes_is_rescaled_sklearn_shrinkage():
    # D ((N-1) S + tr(S) I)^-1 is the inverse of sklearn's shrunk covariance with lam = D / (N - 1 + D) times
    # c = N (N - 1 + D) / (D (N - 1)), so up to the (uniform) log-prior the GDA logits are sklearn's divided by c.
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    x, y, zs = _gaussian_data(seed=1)
    n, d = x.shape
    c = zs.shape[1]
    lam, factor = d / (n - 1 + d), n * (n - 1 + d) / (d * (n - 1))
    xn = F.normalize(x, dim=-1).numpy()
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=lam, priors=np.full(c, 1 / c))
    ref = (lda.fit(xn, y.numpy()).decision_function(xn) - math.log(1 / c)) / factor
    head = GDA.fit(x, y, zs)
    mine = head._gda_logits(torch.from_numpy(xn)) - math.log(1 / c)
    torch.testing.assert_close(mine, torch.from_numpy(ref), rtol=1e-9, atol=1e-9)


def test_separates_gaussian_blobs_with_uninformative_zero_shot():
    g = torch.Generator().manual_seed(0)
    d = 8
    centres = F.normalize(torch.randn(2, d, generator=g), dim=-1) * 3.0

    def draw(n):
        y = torch.arange(2).repeat_interleave(n)
        return centres[y] + 0.4 * torch.randn(2 * n, d, generator=g), y

    x, y = draw(16)
    xt, yt = draw(500)
    zs = torch.zeros(d, 2)  # zero-shot says nothing: every logit 0, argmax always class 0
    head = GDA.fit(x, y, zs, alpha=1.0)
    assert (head(xt).argmax(1) == yt).float().mean() > 0.99
    assert (GDA.fit(x, y, zs, alpha=0.0)(xt).argmax(1) == yt).float().mean() == 0.5


def test_fewer_samples_than_dimensions():
    # 3 shots x 2 classes in D = 32: the pooled covariance has rank 4, plain LDA cannot invert it, the paper's
    # estimator can and still separates the classes.
    x, y, zs = _gaussian_data(seed=2, c=2, d=32, k=3, scale=0.2)
    head = GDA.fit(x, y, zs)
    assert torch.isfinite(head.gda_weight).all()
    xt, yt, _ = _gaussian_data(seed=2, c=2, d=32, k=200, scale=0.2)
    assert (head._gda_logits(F.normalize(xt, dim=-1)).argmax(1) == yt).float().mean() > 0.95
    with pytest.raises(ValueError, match="pooled covariance is singular with shrinkage=0.0"):
        GDA.fit(x, y, zs, shrinkage=0.0)


def test_alpha_zero_is_zero_shot_exactly():
    x, y, zs = _gaussian_data()
    q = torch.randn(7, x.shape[1], dtype=torch.float64) * 5
    assert torch.equal(GDA.fit(x, y, zs, alpha=0.0)(q), 100.0 * (F.normalize(q, dim=-1) @ zs))


def test_one_shot_without_variation_warns_and_falls_back_to_zero_shot():
    x, y, zs = _gaussian_data(k=1)
    with pytest.warns(UserWarning, match="no within-class variation"):
        head = GDA.fit(x, y, zs, alpha=10.0)
    assert torch.equal(head.gda_weight, torch.zeros_like(head.gda_weight))
    q = torch.randn(9, x.shape[1], dtype=torch.float64)
    assert torch.equal(head(q).argmax(1), (F.normalize(q, dim=-1) @ zs).argmax(1))


def test_state_dict_round_trip_and_float32_default():
    x, y, zs = _gaussian_data()
    head = GDA.fit(x.float(), y, zs.float(), alpha=0.01, logit_scale=50.0)
    assert head.gda_weight.dtype == torch.float32
    blank = GDA(torch.zeros_like(head.gda_weight), torch.zeros_like(head.gda_bias), torch.zeros_like(head.zs_weights))
    blank.load_state_dict(head.state_dict())
    assert (blank.alpha, blank.logit_scale) == (0.01, 50.0)
    assert torch.equal(blank(x.float()), head(x.float()))
    assert list(head.parameters()) == []


def test_search_matches_brute_force_and_uses_default_grid():
    x, y, zs = _gaussian_data(seed=3, k=4, scale=0.6)
    xv, yv, _ = _gaussian_data(seed=3, k=4, scale=0.6)
    xv = xv + 0.3 * torch.randn(xv.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    head = GDA.search(x, y, zs, xv, yv)
    alphas = [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0]  # the reference code's list
    assert [r["alpha"] for r in head.search_result["table"]] == alphas
    best, acc, table = search_hparams(lambda alpha: GDA.fit(x, y, zs, alpha=alpha), {"alpha": alphas}, xv, yv)
    assert head.search_result == {"best_params": best, "best_acc": acc, "table": table}
    assert head.alpha == best["alpha"]

    grid = {"shrinkage": ["empirical_bayes", 0.5], "alpha": [0.01, 1.0]}
    head = GDA.search(x, y, zs, xv, yv, grid=grid)
    best, acc, table = search_hparams(lambda shrinkage, alpha: GDA.fit(x, y, zs, alpha=alpha, shrinkage=shrinkage),
                                      grid, xv, yv)
    assert head.search_result["table"] == table and head.search_result["best_params"] == best
    expected = GDA.fit(x, y, zs, alpha=best["alpha"], shrinkage=best["shrinkage"])
    assert torch.equal(head(xv), expected(xv))


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(labels=torch.tensor([0, 0, 1, 1, 0, 1])), ValueError, r"no sample for class\(es\) 2"),
        (dict(labels=torch.tensor([0, 1, 2, 3, 0, 1])), ValueError, r"labels must lie in \[0, 3\)"),
        (dict(labels=torch.tensor([0, 1, 2])), ValueError, r"labels must have shape \(6,\)"),
        (dict(labels=torch.tensor([0.0, 1, 2, 0, 1, 2])), TypeError, "integer class indices"),
        (dict(zs_weights=torch.randn(3, 5)), ValueError, "zs_weights has 3 rows"),
        (dict(features=torch.randn(6, 5).long()), TypeError, "floating-point"),
        (dict(shrinkage="ledoit_wolf"), ValueError, "shrinkage must be 'empirical_bayes' or a float"),
        (dict(shrinkage=1.5), ValueError, r"shrinkage must be 'empirical_bayes' or a float in \[0, 1\]"),
        (dict(shrinkage=None), TypeError, "shrinkage must be"),
        (dict(alpha=-1.0), ValueError, "alpha must be >= 0"),
        (dict(logit_scale=float("inf")), ValueError, "logit_scale must be finite"),
    ],
)
def test_fit_rejects_bad_input(change, exc, match):
    g = torch.Generator().manual_seed(0)
    kw = dict(features=torch.randn(6, 5, generator=g), labels=torch.tensor([0, 1, 2, 0, 1, 2]),
              zs_weights=torch.randn(5, 3, generator=g))
    kw.update(change)
    with pytest.raises(exc, match=match):
        GDA.fit(**kw)


def test_search_and_forward_reject_bad_input():
    x, y, zs = _gaussian_data()
    with pytest.raises(ValueError, match="grid key 'beta' is not searchable"):
        GDA.search(x, y, zs, x, y, grid={"beta": [1.0]})
    with pytest.raises(ValueError, match="shrinkage must be"):
        GDA.search(x, y, zs, x, y, grid={"shrinkage": [2.0]})
    with pytest.raises(ValueError, match=r"val_labels must lie in \[0, 3\)"):
        GDA.search(x, y, zs, x, y + 1)
    with pytest.raises(ValueError, match=r"features must have shape \(N, 5\)"):
        GDA.fit(x, y, zs)(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"needs N >= 2"):
        GDA.fit(x[:1], y[:1], zs[:, :1])
