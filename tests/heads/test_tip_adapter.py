"""Tip-Adapter / Tip-Adapter-F against hand-computed logits, the fine-tuning contract (starts at Tip-Adapter, lowers
the training loss, moves only the keys, deterministic under its seed), and the validation-split grid search."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vpeft.heads import TipAdapter, TipAdapterF, search_hparams
from vpeft.heads.tip_adapter import DEFAULT_GRID


def _toy(seed: int = 0, n_per_class: int = 8, c: int = 4, d: int = 16, spread: float = 0.8, draw_seed: int = 100):
    """Class-clustered raw (unnormalised) features and a random zero-shot classifier; ``seed`` fixes the class
    centres and the classifier, ``draw_seed`` the samples (so a validation split shares the centres)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=g)
    zs = F.normalize(torch.randn(d, c, generator=g), dim=0)
    y = torch.arange(c).repeat_interleave(n_per_class)
    x = 3.0 * (centres[y] + spread * torch.randn(len(y), d, generator=torch.Generator().manual_seed(draw_seed)))
    return x, y, zs


# ---------------------------------------------------------------------------------------------------------------
# Tip-Adapter
# ---------------------------------------------------------------------------------------------------------------


def test_hand_computed_logits():
    # Training features (unnormalised on purpose): (2, 0) -> class 0, (0, 0.5) -> class 1, (3, 4) -> class 1.
    # Normalised keys: (1, 0), (0, 1), (0.6, 0.8).
    train = torch.tensor([[2.0, 0.0], [0.0, 0.5], [3.0, 4.0]])
    labels = torch.tensor([0, 1, 1])
    # Zero-shot classifier (D, C): class 0 text embedding (0.8, 0.6), class 1 (0.6, 0.8) as columns.
    zs = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
    head = TipAdapter.fit(train, labels, zs, alpha=2.0, beta=3.0, logit_scale=100.0)

    query = torch.tensor([[6.0, 8.0]])  # normalised: (0.6, 0.8)
    # cosine similarities with the keys: 0.6, 0.8, 1.0 -> affinities exp(-3 * (1 - cos)).
    a0, a1, a2 = math.exp(-3 * 0.4), math.exp(-3 * 0.2), math.exp(0.0)
    cache = [a0, a1 + a2]  # one-hot values: key 0 votes class 0, keys 1 and 2 vote class 1
    zero_shot = [0.6 * 0.8 + 0.8 * 0.6, 0.6 * 0.6 + 0.8 * 0.8]  # 0.96, 1.0
    expected = torch.tensor([[100 * zero_shot[0] + 2 * cache[0], 100 * zero_shot[1] + 2 * cache[1]]])
    torch.testing.assert_close(head(query), expected, rtol=1e-6, atol=1e-5)

    torch.testing.assert_close(head.cache_keys, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
    assert torch.equal(head.cache_values, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))


def test_alpha_zero_is_zero_shot_exactly():
    x, y, zs = _toy()
    query = torch.randn(10, x.shape[1], generator=torch.Generator().manual_seed(1)) * 7
    head = TipAdapter.fit(x, y, zs, alpha=0.0, beta=5.0, logit_scale=100.0)
    assert torch.equal(head(query), 100.0 * (F.normalize(query, dim=-1) @ zs))


def test_raw_and_normalised_features_agree():
    x, y, zs = _toy()
    head = TipAdapter.fit(x, y, zs, alpha=1.5, beta=4.0)
    same = TipAdapter.fit(F.normalize(x, dim=-1), y, zs, alpha=1.5, beta=4.0)
    q = torch.randn(5, x.shape[1])
    torch.testing.assert_close(head(q), same(F.normalize(q, dim=-1)))
    torch.testing.assert_close(head(q), head(q * 42.0))


def test_state_dict_round_trip_keeps_hyper_parameters():
    x, y, zs = _toy()
    head = TipAdapter.fit(x, y, zs, alpha=1.17, beta=5.5, logit_scale=50.0)
    blank = TipAdapter(torch.ones_like(head.cache_keys), torch.zeros_like(head.cache_values),
                       torch.zeros_like(head.zs_weights))
    blank.load_state_dict(head.state_dict())
    assert (blank.alpha, blank.beta, blank.logit_scale) == (1.17, 5.5, 50.0)
    q = torch.randn(4, x.shape[1])
    assert torch.equal(blank(q), head(q))
    assert list(head.parameters()) == []  # training-free: nothing to optimise


def test_half_precision_input_is_computed_in_float32():
    x, y, zs = _toy()
    head = TipAdapter.fit(x.half(), y, zs.half())
    assert head.cache_keys.dtype == torch.float32 and head(x.half()).dtype == torch.float32


def test_default_grid_is_reference_range():
    # Reference lists: 200 betas from 0.1 in steps of (7 - 0.1) / 200, 20 alphas from 0.1 in steps of (3 - 0.1) / 20.
    assert list(DEFAULT_GRID) == ["beta", "alpha"]
    beta, alpha = DEFAULT_GRID["beta"], DEFAULT_GRID["alpha"]
    assert len(beta) == 200 and len(alpha) == 20
    assert beta[0] == pytest.approx(0.1) and beta[-1] == pytest.approx(0.1 + 199 * 0.0345)
    assert alpha[0] == pytest.approx(0.1) and alpha[-1] == pytest.approx(0.1 + 19 * 0.145)


def test_search_matches_brute_force_over_heads():
    x, y, zs = _toy(seed=0)
    xv, yv, _ = _toy(seed=0, n_per_class=4, draw_seed=7)
    grid = {"beta": [0.5, 2.0, 8.0], "alpha": [0.0, 1.0, 4.0, 16.0]}
    head = TipAdapter.search(x, y, zs, xv, yv, grid=grid)
    best, acc, table = search_hparams(lambda alpha, beta: TipAdapter.fit(x, y, zs, alpha=alpha, beta=beta), grid,
                                      xv, yv)
    assert head.search_result["table"] == table
    assert head.search_result["best_params"] == best and head.search_result["best_acc"] == acc
    assert (head.alpha, head.beta) == (best["alpha"], best["beta"])
    correct = (head(xv).argmax(1) == yv).float().mean().item()
    assert correct == pytest.approx(acc)


def test_search_with_partial_grid_keeps_fitted_beta():
    x, y, zs = _toy()
    head = TipAdapter.search(x, y, zs, x[::2], y[::2], grid={"alpha": [0.0, 1.0]}, beta=3.0)
    assert head.beta == 3.0 and [row["alpha"] for row in head.search_result["table"]] == [0.0, 1.0]


# ---------------------------------------------------------------------------------------------------------------
# Tip-Adapter-F
# ---------------------------------------------------------------------------------------------------------------


def test_tip_adapter_f_starts_as_tip_adapter():
    x, y, zs = _toy()
    q = torch.randn(6, x.shape[1])
    tip = TipAdapter.fit(x, y, zs, alpha=2.0, beta=5.5)
    untrained = TipAdapterF.fit(x, y, zs, alpha=2.0, beta=5.5, epochs=0)
    built = TipAdapterF(tip.cache_keys, tip.cache_values, tip.zs_weights, alpha=2.0, beta=5.5)
    assert torch.equal(untrained(q), tip(q)) and torch.equal(built(q), tip(q))
    assert [n for n, _ in built.named_parameters()] == ["cache_keys"]


def _train_loss(head, x, y):
    with torch.no_grad():
        return F.cross_entropy(head(x), y).item()


def test_tip_adapter_f_lowers_training_loss_and_only_moves_keys():
    x, y, zs = _toy(spread=1.2)
    kw = dict(alpha=1.0, beta=1.0, logit_scale=10.0)
    before = TipAdapterF.fit(x, y, zs, epochs=0, **kw)
    rng = torch.get_rng_state()
    after = TipAdapterF.fit(x, y, zs, epochs=20, lr=1e-2, batch_size=8, seed=0, **kw)
    assert torch.equal(torch.get_rng_state(), rng)  # private generator: global RNG untouched

    assert _train_loss(after, x, y) < 0.5 * _train_loss(before, x, y)  # measured 2.85 -> 0.49
    sd0, sd1 = before.state_dict(), after.state_dict()
    assert sd0.keys() == sd1.keys()
    for name in sd0:
        if name == "cache_keys":
            assert not torch.equal(sd0[name], sd1[name])
        else:
            assert torch.equal(sd0[name], sd1[name]), name


def test_tip_adapter_f_is_deterministic_under_seed():
    x, y, zs = _toy()
    kw = dict(epochs=3, batch_size=8, lr=1e-2)
    a = TipAdapterF.fit(x, y, zs, seed=3, **kw)
    b = TipAdapterF.fit(x, y, zs, seed=3, **kw)
    c = TipAdapterF.fit(x, y, zs, seed=4, **kw)
    assert torch.equal(a.cache_keys, b.cache_keys)
    assert not torch.equal(a.cache_keys, c.cache_keys)  # a different shuffle gives different mini-batches


def test_tip_adapter_f_trains_under_no_grad_and_search_uses_trained_keys():
    x, y, zs = _toy()
    with torch.no_grad():
        head = TipAdapterF.search(x, y, zs, x[1::2], y[1::2], grid={"alpha": [0.5, 1.0], "beta": [1.0]},
                                  epochs=2, batch_size=8, lr=1e-2)
    untrained = TipAdapter.fit(x, y, zs)
    assert not torch.equal(head.cache_keys, untrained.cache_keys)
    assert head.cache_keys.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# search_hparams
# ---------------------------------------------------------------------------------------------------------------


class _Threshold(torch.nn.Module):
    """Predicts class 1 iff the first feature exceeds ``t``."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t

    def forward(self, x):
        return torch.stack([self.t - x[:, 0], x[:, 0] - self.t], dim=1)


_VAL_X = torch.tensor([[0.1], [0.3], [0.6], [0.9]])
_VAL_Y = torch.tensor([0, 0, 1, 1])


def test_search_hparams_picks_known_best():
    # Accuracies: t=0 -> 2/4, t=0.25 -> 3/4, t=0.5 -> 4/4, t=0.75 -> 3/4.
    best, acc, table = search_hparams(_Threshold, {"t": [0.0, 0.25, 0.5, 0.75]}, _VAL_X, _VAL_Y)
    assert best == {"t": 0.5} and acc == 1.0
    assert [(r["t"], r["acc"]) for r in table] == [(0.0, 0.5), (0.25, 0.75), (0.5, 1.0), (0.75, 0.75)]


def test_search_hparams_ties_go_to_first_in_grid_order():
    best, acc, _ = search_hparams(_Threshold, {"t": [0.7, 0.45, 0.5, 0.4]}, _VAL_X, _VAL_Y)
    assert best == {"t": 0.45} and acc == 1.0


def test_search_hparams_product_order_first_key_outermost():
    seen = []

    def build(a, b):
        seen.append((a, b))
        return _Threshold(0.5)

    best, _, table = search_hparams(build, {"a": [1, 2], "b": ["x", "y", "z"]}, _VAL_X, _VAL_Y)
    order = [(1, "x"), (1, "y"), (1, "z"), (2, "x"), (2, "y"), (2, "z")]
    assert seen == order and [(r["a"], r["b"]) for r in table] == order
    assert best == {"a": 1, "b": "x"}  # all tie


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(features=torch.randn(5, 16)), ValueError, "labels must have shape"),
        (dict(features=torch.randn(32, 8)), ValueError, "zs_weights has 16 rows"),
        (dict(features=torch.randn(32)), ValueError, r"features must have shape \(N, D\)"),
        (dict(features=torch.randint(0, 3, (32, 16))), TypeError, "floating-point"),
        (dict(features=[[0.0] * 16] * 32), TypeError, "features must be a torch.Tensor"),
        (dict(labels=torch.full((32,), 4)), ValueError, r"labels must lie in \[0, 4\)"),
        (dict(labels=torch.full((32,), -1)), ValueError, r"labels must lie in \[0, 4\)"),
        (dict(labels=torch.zeros(32)), TypeError, "integer class indices"),
        (dict(zs_weights=torch.randn(4, 16)), ValueError, "zs_weights has 4 rows"),
        (dict(zs_weights=torch.randn(16)), ValueError, r"zs_weights must have shape \(D, C\)"),
        (dict(beta=0.0), ValueError, "beta must be > 0"),
        (dict(beta=-1.0), ValueError, "beta must be > 0"),
        (dict(alpha=-0.5), ValueError, "alpha must be >= 0"),
        (dict(alpha=float("nan")), ValueError, "alpha must be finite"),
        (dict(alpha=True), TypeError, "alpha must be a real number"),
        (dict(logit_scale="100"), TypeError, "logit_scale must be a real number"),
    ],
)
def test_fit_rejects_bad_input(change, exc, match):
    x, y, zs = _toy()
    kw = dict(features=x, labels=y, zs_weights=zs)
    kw.update(change)
    with pytest.raises(exc, match=match):
        TipAdapter.fit(**kw)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(epochs=-1), ValueError, "epochs must be >= 0"),
        (dict(epochs=2.0), TypeError, "epochs must be an int"),
        (dict(lr=0.0), ValueError, "lr must be > 0"),
        (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
        (dict(seed=None), TypeError, "seed must be an int"),
    ],
)
def test_tip_adapter_f_rejects_bad_training_args(change, exc, match):
    x, y, zs = _toy()
    with pytest.raises(exc, match=match):
        TipAdapterF.fit(x, y, zs, **change)


def test_forward_and_search_reject_bad_input():
    x, y, zs = _toy()
    head = TipAdapter.fit(x, y, zs)
    with pytest.raises(ValueError, match=r"features must have shape \(N, 16\)"):
        head(torch.randn(3, 15))
    with pytest.raises(TypeError, match="features must be a torch.Tensor"):
        head(x.numpy())
    with pytest.raises(ValueError, match="grid key 'gamma' is not searchable"):
        TipAdapter.search(x, y, zs, x, y, grid={"gamma": [1.0]})
    with pytest.raises(ValueError, match=r"grid\['beta'\] value must be > 0"):
        TipAdapter.search(x, y, zs, x, y, grid={"beta": [1.0, 0.0]})
    with pytest.raises(ValueError, match=r"val_labels must lie in \[0, 4\)"):
        TipAdapter.search(x, y, zs, x, y + 1, grid={"alpha": [1.0]})
    with pytest.raises(ValueError, match="val_features has feature dimension 3"):
        TipAdapter.search(x, y, zs, x[:, :3], y, grid={"alpha": [1.0]})
    with pytest.raises(ValueError, match=r"cache_values must have shape \(N, C\)"):
        TipAdapter(head.cache_keys, head.cache_values[:, :2], zs)


def test_search_hparams_rejects_bad_input():
    with pytest.raises(ValueError, match="grid must name at least one parameter"):
        search_hparams(_Threshold, {}, _VAL_X, _VAL_Y)
    with pytest.raises(ValueError, match=r"grid\['t'\] is empty"):
        search_hparams(_Threshold, {"t": []}, _VAL_X, _VAL_Y)
    with pytest.raises(TypeError, match=r"grid\['t'\] must be a sequence"):
        search_hparams(_Threshold, {"t": 0.5}, _VAL_X, _VAL_Y)
    with pytest.raises(TypeError, match="grid must be a dict"):
        search_hparams(_Threshold, [("t", [0.5])], _VAL_X, _VAL_Y)
    with pytest.raises(TypeError, match="build must be callable"):
        search_hparams(None, {"t": [0.5]}, _VAL_X, _VAL_Y)
    with pytest.raises(ValueError, match=r"val_labels must have shape \(4,\)"):
        search_hparams(_Threshold, {"t": [0.5]}, _VAL_X, _VAL_Y[:3])
    with pytest.raises(ValueError, match=r"val_labels must lie in \[0, 2\)"):
        search_hparams(_Threshold, {"t": [0.5]}, _VAL_X, _VAL_Y + 1)
    with pytest.raises(ValueError, match="must return \\(N, C\\) logits"):
        search_hparams(lambda t: (lambda x: x[:, 0]), {"t": [0.5]}, _VAL_X, _VAL_Y)
