"""UniPT: Universal Parallel Tuning (Diao, Wan, Zhang, Jia, Lu and Chen, "UniPT: Universal Parallel Tuning for
Transfer Learning with Efficient Parameter and Memory", CVPR 2024, arXiv:2308.14316).

A lightweight network runs in parallel to the frozen backbone on its detached intermediate features ``F_0 ..
F_(n-1)`` (width ``D``, ``L`` tokens) and the backbone's last-layer features ``F_N`` (here: the tower's final-norm
output ``y``), with ``d = D / r``:

Parallel interaction module (per layer ``l``, the last-layer features as queries/anchors)::

    a = W_a ReLU(F_N) + b_a,     f_l = W_l ReLU(F_l) + b_l                    # (L, d) each
    A_l = L1Norm_rows(ReLU(a f_l^T))                                           # (L, L), no softmax, no scaling
    g_l = A_l f_l + f_l

Confidence aggregation module::

    c_l = w_c^T (mean_t(a) * mean_t(f_l)) + b_c,     [w_0 .. w_(n-1)] = softmax_l(c)
    out = F_N + W_u ReLU(sum_l w_l g_l) + b_u                                  # same shape as F_N

The intermediate features of layer ``l`` are the tokens entering block ``l``: the embedding output for ``l = 0`` and
block ``l - 1``'s output after that (the reference's BERT/CLIP hidden-state lists); the last block's output enters
through ``F_N``. On causal (text) towers everything stays causal: anchor token ``t`` only attends to tokens ``<= t``
and its confidences use the running means over tokens ``<= t`` (at CLIP's pooled end-of-text token these are the
means over the real tokens, which the reference takes with a padding mask), so later tokens and padding never
change earlier outputs.

vpeft attaches UniPT through the side-network machinery (:mod:`vpeft.methods._side`): parameter-free taps on the
blocks record the detached block inputs and an adapter on the tower's final norm computes ``out`` in place of the
final norm's output. Nothing inside the backbone requires grad, so autograd keeps no backbone activation.

Memory: a learned projection of a backbone feature must keep that feature (``D`` wide) for its weight gradient; the
taps share the storage of the backbone's own block outputs, so that costs no copy and is the floor. Two exact custom
autograd functions keep everything else small: ``Linear(ReLU(.))`` recomputes the ``ReLU`` from its input in
backward (anchor and up-projection), and the interaction + aggregation saves only the anchors ``a``, the confidences
and the taps, recomputing ``f_l``, the ``(L, L)`` maps and ``g_l`` one layer at a time in backward (one more pass of
the down-projections, about ``n / r`` ``D x D`` token matmuls). The confidences use
``mean_t(f_l) = W_l mean_t(ReLU(F_l)) + b_l`` (causal towers keep one ``(L, d)`` running mean per layer instead).
Tests compare values and gradients with the plain-autograd formulation (``ParallelNetwork.fuse(..., reference=True)``).
ViT-S/16, batch 8, fp32: 0.077x the activation bytes full fine-tuning saves (plain autograd: 0.20x).

Defaults: ``r = 2`` (the reference's ``downsample_D_factor`` in its VSE-infinity scripts; its CLIP4Clip setup uses
1), every block's input as an intermediate feature (``layers=None``), PyTorch's default Linear initialisation.

Trainable parameters (width ``D``, ``n`` intermediate layers, ``d = D / r``)::

    (n + 1) (D d + d)  +  (d + 1)  +  (d D + D)        # n + 1 down-projections, confidence gate, up-projection

ViT-B/16 (``D = 768``, 12 blocks), r = 2: ``13 * 295,296 + 385 + 295,680 = 4,134,913`` (the head comes on top).

Deviations from the reference implementation (Paranioar/UniPT; its CLIP4Clip, VSE-infinity, CLIP-ViL and MDETR
variants differ in details):
    * Only the paper's abstract was available here; the equations above were read off the reference code
      (``CLIP4Clip/modules/module_adapter.py``, ``VSE-infty/lib/adapter_for_transformer.py``), choosing between its
      variants as listed below.
    * Down-projections are ``Linear(ReLU(.))`` with a separate one for the anchor and the output is a residual on the
      backbone's last-layer features, as in the reference's CLIP4Clip (ViT) variant; the VSE-infinity (BERT)
      variant uses ``LayerNorm(Linear(.))`` and an extra projection and replaces the backbone features instead.
    * The token-aligned residual ``g_l = A_l f_l + f_l`` of the VSE-infinity variant (square maps) is used; the
      CLIP4Clip variant, with a single pooled anchor, adds the class token's ``f_l`` instead.
    * Confidence scores use the mean over all tokens of ``a`` and ``f_l`` (the VSE-infinity form; the CLIP4Clip
      variant takes the pooled token of ``a``); on causal towers the running means, per token (see above), in place
      of the reference's padding mask.
    * Intermediate features are the block inputs of ``layers`` (default all blocks: the embedding output and the
      outputs of blocks ``0 .. N-2``); the anchor is the tower's final-norm output.
    * One tower per config; apply two configs (``towers=["visual"]``, ``towers=["text"]``) to tune both CLIP towers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._side import SideTuningMethod, check_positive_int, check_side_fields, divisors
from .base import PeftConfig, register_method

#: Floor of the L1 normaliser of the interaction maps (as in the reference).
L1_EPS = 1e-6


@dataclass
class UniPTConfig(PeftConfig):
    """UniPT configuration.

    Attributes:
        r: Reduction factor: the parallel network is ``width / r`` wide. Must divide the tower's width.
        layers: Blocks whose *input* is an intermediate feature (default all: the embedding output and every block
            output but the last, which is the anchor).
        towers: The one tower to adapt (default: the backbone's default tower, the image tower for CLIP).
    """

    r: int = 2

    def validate(self) -> None:  # noqa: D102
        super().validate()
        check_side_fields(self)
        check_positive_int(self, "r")


# --- memory-lean building blocks ----------------------------------------------------------------------------------

class _ReLULinear(torch.autograd.Function):
    """``F.linear(ReLU(x), W, b)`` saving ``x`` (a tap: storage shared with the backbone) instead of ``ReLU(x)``."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # noqa: D102
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x.relu(), weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # noqa: D102
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        g2 = g.reshape(-1, g.shape[-1])
        if ctx.needs_input_grad[0]:
            gx = ((g @ weight.to(g.dtype)) * (x > 0)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gw = (g2.t() @ x.relu().reshape(-1, x.shape[-1]).to(g.dtype)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0).to(weight.dtype)
        return gx, gw, gb


def relu_linear(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``linear(ReLU(x))``; backward recomputes ``ReLU(x)`` from ``x``."""
    return _ReLULinear.apply(x, linear.weight, linear.bias)


def _maps(a: torch.Tensor, f: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores ``a f^T``, row sums of the rectified, masked scores, L1-normalised maps)."""
    s = a @ f.transpose(-1, -2)
    r = s.relu()
    if causal:
        r = r.tril()
    z = r.sum(-1, keepdim=True)
    return s, z, r / z.clamp_min(L1_EPS)


def interaction_reference(a: torch.Tensor, f: torch.Tensor, w: torch.Tensor, causal: bool) -> torch.Tensor:
    """``sum_l w[:, l] * (A_l f_l + f_l)`` with plain autograd (the semantics :func:`parallel_interaction` implements).

    Args:
        a: Anchors ``(B, L, d)``.
        f: Intermediate features ``(n, B, L, d)``.
        w: Confidence weights ``(B, 1, n)`` (one per layer) or ``(B, L, n)`` (per token, causal towers).
        causal: Restrict anchor token ``t`` to tokens ``<= t``.
    """
    out = None
    for i in range(f.shape[0]):
        amap = _maps(a, f[i], causal)[2]
        g = (amap @ f[i] + f[i]) * w[:, :, i, None]
        out = g if out is None else out + g
    return out


class _ParallelInteraction(torch.autograd.Function):
    """``sum_l w_l (A_l f_l + f_l)`` with ``f_l = W_l ReLU(F_l) + b_l`` computed inside.

    Saves ``a``, ``w`` and the taps ``F_l`` (storage shared with the backbone's block outputs); ``f_l``, the maps
    ``A_l`` and ``g_l`` are recomputed layer by layer in backward, so at most one layer's ``(L, L)`` map and ``f_l``
    exist at a time. The taps are detached backbone features: no gradient flows to them.
    """

    @staticmethod
    def forward(ctx, a, w, causal, n, *tensors):  # noqa: D102
        taps, weights, biases = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
        ctx.causal, ctx.n = causal, n
        ctx.save_for_backward(a, w, *tensors)
        out = torch.zeros_like(a)
        for i in range(n):
            f = F.linear(taps[i].to(a.dtype).relu(), weights[i], biases[i])
            amap = _maps(a, f, causal)[2]
            out += (amap @ f + f) * w[:, :, i, None].to(a.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):  # noqa: D102
        a, w, *tensors = ctx.saved_tensors
        n = ctx.n
        taps, weights, biases = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
        need = ctx.needs_input_grad
        gout = gout.to(a.dtype)
        ga = torch.zeros_like(a) if need[0] else None
        gw = torch.empty(w.shape, dtype=a.dtype, device=w.device) if need[1] else None
        gweights: list = [None] * n
        gbiases: list = [None] * n
        for i in range(n):
            x = taps[i].to(a.dtype).relu()
            f = F.linear(x, weights[i], biases[i])
            s, z, amap = _maps(a, f, ctx.causal)
            if gw is not None:
                gwi = (gout * (amap @ f + f)).sum(-1)
                gw[:, :, i] = gwi.sum(1, keepdim=True) if w.shape[1] == 1 else gwi
            gg = gout * w[:, :, i, None].to(a.dtype)
            gmap = gg @ f.transpose(-1, -2)
            zc = z.clamp_min(L1_EPS)
            # amap = r / max(z, eps): the normaliser carries gradient only where z > eps
            gr = gmap / zc - (gmap * amap).sum(-1, keepdim=True) / zc * (z > L1_EPS)
            gs = gr * (s > 0)
            if ctx.causal:
                gs = gs.tril()
            if ga is not None:
                ga += gs @ f
            gf = amap.transpose(-1, -2) @ gg + gg + gs.transpose(-1, -2) @ a
            gf2 = gf.reshape(-1, gf.shape[-1])
            if need[4 + n + i]:
                gweights[i] = (gf2.t() @ x.reshape(-1, x.shape[-1])).to(weights[i].dtype)
            if need[4 + 2 * n + i]:
                gbiases[i] = gf2.sum(0).to(biases[i].dtype)
        gw = gw.to(w.dtype) if gw is not None else None
        return (ga, gw, None, None, *([None] * n), *gweights, *gbiases)


def parallel_interaction(a: torch.Tensor, w: torch.Tensor, taps: list[torch.Tensor], downs: list[nn.Linear],
                         causal: bool) -> torch.Tensor:
    """``sum_l w[:, l] * (A_l f_l + f_l)`` with ``f_l = downs[l](ReLU(taps[l]))``, memory-lean (see
    :class:`_ParallelInteraction`; values and gradients equal :func:`interaction_reference`'s)."""
    if any(t.requires_grad for t in taps):
        raise ValueError("parallel_interaction: the taps must be detached backbone features")
    if any(d.bias is None for d in downs):
        raise ValueError("parallel_interaction: the down-projections need biases")
    return _ParallelInteraction.apply(a, w, causal, len(taps), *taps, *[d.weight for d in downs],
                                      *[d.bias for d in downs])


# --- the parallel network -----------------------------------------------------------------------------------------

class ParallelNetwork(nn.Module):
    """UniPT's parallel network of one tower (every trainable tensor of the method).

    Attributes:
        anchor: Down-projection of the last-layer features (``W_a``).
        downs: Down-projections of the intermediate features, keyed by block index (``W_l``).
        gate: Confidence scorer ``d -> 1`` (``w_c``).
        up: Up-projection ``d -> D`` (``W_u``).
    """

    def __init__(self, width: int, d: int, layers: list[int], causal: bool, like: torch.Tensor) -> None:
        super().__init__()
        kw = dict(device=like.device, dtype=like.dtype)
        self.layers, self.causal = list(layers), causal
        self.anchor = nn.Linear(width, d, **kw)
        self.downs = nn.ModuleDict({str(i): nn.Linear(width, d, **kw) for i in layers})
        self.gate = nn.Linear(d, 1, **kw)
        self.up = nn.Linear(d, width, **kw)

    def token_means(self, t: torch.Tensor) -> torch.Tensor:
        """Mean over the tokens, ``(B, 1, d)``; on causal towers the running means over tokens ``<= t``,
        ``(B, L, d)``."""
        if not self.causal:
            return t.mean(dim=1, keepdim=True)
        count = torch.arange(1, t.shape[1] + 1, device=t.device, dtype=t.dtype).view(1, -1, 1)
        return t.cumsum(dim=1) / count

    def confidences(self, a: torch.Tensor, means: list[torch.Tensor]) -> torch.Tensor:
        """Softmax over layers of ``gate(mean(a) * mean(f_l))``: ``(B, 1, n)``, or ``(B, L, n)`` on causal towers.

        ``means`` are the token means of the ``f_l`` (:meth:`token_means`). The gate is applied as
        ``sum_k (w_c * mean(a))_k mean(f_l)_k + b_c``, which keeps one product per layer out of the graph.
        """
        u = self.token_means(a) * self.gate.weight[0]
        return torch.cat([(u * m).sum(-1, keepdim=True) for m in means], dim=-1).add(self.gate.bias).softmax(-1)

    def fuse(self, tap, x: torch.Tensor, y: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """``y + Up(ReLU(sum_l w_l g_l))`` from the taps (``tap(layer, "in")``) and the final-norm output ``y``.

        ``reference=True`` runs the plain-autograd formulation (same function; it saves every ``ReLU(F_l)``, ``f_l``
        and map for backward).
        """
        dtype = self.up.weight.dtype
        taps = [tap(i, "in").to(dtype) for i in self.layers]
        downs = [self.downs[str(i)] for i in self.layers]
        if reference:
            a = self.anchor(y.to(dtype).relu())
            fs = [d(t.relu()) for d, t in zip(downs, taps)]
            w = self.confidences(a, [self.token_means(f) for f in fs])
            agg = interaction_reference(a, torch.stack(fs), w, self.causal)
            return y + self.up(agg.relu()).to(y.dtype)
        a = relu_linear(y.to(dtype), self.anchor)
        if self.causal:
            means = [self.token_means(relu_linear(t, d)) for d, t in zip(downs, taps)]
        else:  # mean_t(W ReLU(F) + b) = W mean_t(ReLU(F)) + b: no (L, d) f_l in the graph
            means = [d(t.relu().mean(dim=1, keepdim=True)) for d, t in zip(downs, taps)]
        agg = parallel_interaction(a, self.confidences(a, means), taps, downs, self.causal)
        return y + relu_linear(agg, self.up).to(y.dtype)


@register_method
class UniPT(SideTuningMethod):
    """Universal Parallel Tuning: last-layer anchors attend to every intermediate layer; confidence-weighted sum."""

    name = "unipt"
    config_class = UniPTConfig

    def taps(self, depth, layers):  # noqa: D102
        return {i: (True, False) for i in layers}

    def check_tower(self, model, spec, tower):  # noqa: D102
        super().check_tower(model, spec, tower)
        if tower.width % self.config.r:
            raise ValueError(f"UniPTConfig.r={self.config.r} must divide the tower's width {tower.width}; valid r: "
                             f"{divisors(tower.width)}")

    def build_shared(self, model, spec, sites):  # noqa: D102
        tower = spec.towers[sites[0].tower]
        final = model.get_submodule(tower.global_sites["final_norm"])
        like = next(final.parameters(), None)
        like = like if like is not None else next(model.parameters())
        return ParallelNetwork(tower.width, tower.width // self.config.r, self.layer_indices(model, spec),
                               tower.causal, like)
