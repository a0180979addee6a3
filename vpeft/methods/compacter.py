"""Compacter: Efficient Low-Rank Hypercomplex Adapter Layers (Karimi Mahabadi, Henderson and Ruder, NeurIPS 2021,
arXiv:2106.04647).

A bottleneck adapter (Houlsby et al.) ``y + U(GeLU(D(y)))`` whose down-projection ``D`` (d -> k) and up-projection
``U`` (k -> d) are parameterized hypercomplex multiplication (PHM) layers. A PHM layer ``x -> x W + b`` with
``W`` (in x out) builds its weight as a sum of ``n`` Kronecker products

    W = sum_{i=1..n} A_i (x) B_i,        A_i: n x n,   B_i: (in / n) x (out / n),

and Compacter splits the two factors by how they are learned: the "slow" weights ``A_i`` are shared by every
Compacter layer of the model (one ``n x n x n`` tensor, stored once as ``_shared.compacter.phm_rule``), the "fast"
weights ``B_i`` are per layer and low rank, ``B_i = s_i t_i`` with ``s_i``: (in / n) x r and ``t_i``: r x (out / n)
(rank one in the paper). ``in``, ``out`` and ``k`` must therefore be divisible by ``n``.

Placement. Compacter inserts an adapter after the attention and after the feed-forward sub-layer of every block;
Compacter++ keeps only the one after the feed-forward sub-layer, at half the parameters and with the paper's best
results, so it is the default here. Its natural ViT site is the ``mlp`` site: the output of the whole MLP
sub-module, before LayerScale / drop-path and the residual add -- exactly where Houlsby adapters sit in a pre-norm
transformer. The adapter is sequential on that output, ``y + adapter(y)``, as in the paper. Full Compacter is
``targets=["attn_out", "mlp"]`` (the attention output projection, which feeds the residual the same way). On
open_clip both towers work; the image tower is the default, pass ``towers=["visual", "text"]`` for both.

Paper defaults (the authors' T5 recipe, used here): ``n = 4``; reduction factor 32 (``k = d / 32``: 24 on ViT-B/16,
its width 768); rank 1; GeLU non-linearity; Glorot-uniform factors ``s_i``, ``t_i``; ``A_i ~ N(0, 1e-4)`` (the
"phm_init_range" of the official configs), biases zero, so the adapter starts as (nearly) the identity. The paper
also trains the backbone's LayerNorms; in vpeft that is a separate method, so the preset
``configs/method/compacter.yaml`` composes Compacter++ with ``ln_tune``.

Trainable parameters: per adapter ``2 r (d + k)`` PHM factors plus ``d + k`` biases, plus ``n^3`` shared slow weights
once. Compacter++ on ViT-B/16 (12 adapters, d = 768, k = 24, n = 4, r = 1): ``12 * (2 * 792 + 792) + 64 = 28,576``;
full Compacter (24 adapters): ``57,088``. (On T5-base the same counts plus the LayerNorms reproduce the paper's
0.047 % / 0.073 %.)

Deviations from the reference implementation (rabeehk/compacter):
    * When ``k = d / reduction_factor`` is not a multiple of ``n`` it is rounded up to the next multiple of ``n``
      (at least ``n``), because the PHM factorization needs ``n | k``; the paper's settings are all multiples of ``n``
      already (24 on ViT-B, 32 on ViT-L, 16 on CLIP's 512-wide text tower). An explicit ``bottleneck`` must be a
      multiple of ``n`` (``ValueError`` otherwise). The site width ``d`` is read from the module and must be a
      multiple of ``n``: ``ValueError`` naming the site, its width and ``n``, before anything is changed.
    * The PHM weight is materialised once per forward (``d x k``, tiny) and applied with one matmul, instead of
      the reference's batched Kronecker products; the function is the same.
    * GeLU is the exact (erf) GeLU that ViTs use; ``activation="gelu_tanh"`` gives the reference's ``gelu_new``.
    * The adapter is not mergeable (a non-linearity sits between the projections); ``PeftModel.merge`` refuses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Adapter, Method, PeftConfig, register_method

_ACTIVATIONS = ("gelu", "gelu_tanh", "relu")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class CompacterConfig(PeftConfig):
    """Compacter configuration (defaults: Compacter++ with the paper's settings).

    Attributes:
        n: Number of Kronecker summands (and the size of each shared ``A_i``); divides ``d`` and ``k``.
        reduction_factor: Bottleneck ``k = d / reduction_factor`` (rounded up to a multiple of ``n``).
        bottleneck: Explicit bottleneck ``k`` (a multiple of ``n``); overrides ``reduction_factor`` when set.
        rank: Rank of the per-layer fast weights ``B_i = s_i t_i`` (1 in the paper).
        activation: ``"gelu"`` (exact), ``"gelu_tanh"`` (the reference's ``gelu_new``) or ``"relu"``.
        phm_init_std: Standard deviation of the normal init of the shared slow weights ``A_i``.
        targets: Sites whose output the adapter transforms (default ``["mlp"]``, Compacter++; full Compacter:
            ``["attn_out", "mlp"]``). Accepted: ``mlp``, ``attn_out``, ``mlp_out`` and other whole-output sites.
    """

    n: int = 4
    reduction_factor: int = 32
    bottleneck: Optional[int] = None
    rank: int = 1
    activation: str = "gelu"
    phm_init_std: float = 1e-4

    def validate(self) -> None:  # noqa: D102
        super().validate()
        name = type(self).__name__
        for fname in ("n", "reduction_factor", "rank"):
            v = getattr(self, fname)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name}.{fname} must be a positive int, got {v!r}")
        if self.bottleneck is not None:
            if not _is_int(self.bottleneck) or self.bottleneck < 1:
                raise ValueError(f"{name}.bottleneck must be a positive int or None, got {self.bottleneck!r}")
            if self.bottleneck % self.n:
                near = self.n * max(1, self.bottleneck // self.n)
                raise ValueError(f"{name}.bottleneck={self.bottleneck} is not a multiple of n={self.n}; the PHM "
                                 f"factorization needs n | bottleneck (e.g. {near})")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"{name}.activation must be one of {list(_ACTIVATIONS)}, got {self.activation!r}")
        if isinstance(self.phm_init_std, bool) or not isinstance(self.phm_init_std, (int, float)) \
                or not self.phm_init_std >= 0:
            raise ValueError(f"{name}.phm_init_std must be a number >= 0, got {self.phm_init_std!r}")

    def bottleneck_for(self, width: int) -> int:
        """The bottleneck ``k`` used for a site of output width ``width``."""
        if self.bottleneck is not None:
            return self.bottleneck
        return max(self.n, math.ceil(width / self.reduction_factor / self.n) * self.n)


def phm_weight(rule: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``sum_i rule[i] (x) (left[i] @ right[i])``: (n, n, n), (n, p, r), (n, r, q) -> (n p, n q)."""
    n, p, q = rule.shape[0], left.shape[1], right.shape[2]
    fast = left @ right  # (n, p, q)
    # kron(A, B)[a p + c, b q + d] = A[a, b] B[c, d]; summing over i gives the PHM weight in one contraction.
    return torch.einsum("iab,icd->acbd", rule, fast).reshape(n * p, n * q)


def glorot_uniform_(t: torch.Tensor) -> torch.Tensor:
    """Glorot-uniform over the last two dimensions (fan-in and fan-out of each factor matrix)."""
    bound = math.sqrt(6.0 / (t.shape[-2] + t.shape[-1]))
    with torch.no_grad():
        return t.uniform_(-bound, bound)


class CompacterShared(nn.Module):
    """The slow weights ``A_1..A_n`` shared by all Compacter layers: ``phm_rule`` (n, n, n)."""

    def __init__(self, n: int, std: float, like: torch.Tensor) -> None:
        super().__init__()
        self.phm_rule = nn.Parameter(torch.empty(n, n, n, device=like.device, dtype=like.dtype).normal_(0.0, std))


class CompacterAdapter(Adapter):
    """``y + U(act(D(y)))`` with PHM projections; the fast factors are ``{down,up}_{left,right}``.

    Shapes (d = site width, k = bottleneck): ``down_left`` (n, d/n, r), ``down_right`` (n, r, k/n), ``down_bias``
    (k,), ``up_left`` (n, k/n, r), ``up_right`` (n, r, d/n), ``up_bias`` (d,).
    """

    def __init__(self, site, width: int, bottleneck: int, cfg: CompacterConfig, like: torch.Tensor) -> None:
        super().__init__(site)
        n, r = cfg.n, cfg.rank
        kw = dict(device=like.device, dtype=like.dtype)
        self.width, self.bottleneck, self.activation = width, bottleneck, cfg.activation
        self.down_left = nn.Parameter(glorot_uniform_(torch.empty(n, width // n, r, **kw)))
        self.down_right = nn.Parameter(glorot_uniform_(torch.empty(n, r, bottleneck // n, **kw)))
        self.down_bias = nn.Parameter(torch.zeros(bottleneck, **kw))
        self.up_left = nn.Parameter(glorot_uniform_(torch.empty(n, bottleneck // n, r, **kw)))
        self.up_right = nn.Parameter(glorot_uniform_(torch.empty(n, r, width // n, **kw)))
        self.up_bias = nn.Parameter(torch.zeros(width, **kw))

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The PHM weights ``(W_down (d, k), W_up (k, d))`` built with the shared slow weights."""
        shared = self.shared
        if shared is None:
            raise RuntimeError("this Compacter adapter has no shared slow weights (build it with vpeft.get_peft_model)")
        rule = shared.phm_rule
        return phm_weight(rule, self.down_left, self.down_right), phm_weight(rule, self.up_left, self.up_right)

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return F.relu(h)
        return F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: D102
        w_down, w_up = self.weights()
        h = self._act(F.linear(y, w_down.t().to(y.dtype), self.down_bias.to(y.dtype)))
        return y + F.linear(h, w_up.t().to(y.dtype), self.up_bias.to(y.dtype))

    def extra_repr(self) -> str:
        return f"site={self.site.qualified!r}, width={self.width}, bottleneck={self.bottleneck}"


def output_width(module: nn.Module) -> Optional[int]:
    """Output channels of a site's module: a Linear's ``out_features``, else the last Linear inside (an MLP's
    output projection); ``None`` when the module holds no Linear."""
    from .layers import unwrap

    m = unwrap(module)
    if isinstance(m, nn.Linear):
        return m.out_features
    last = None
    for sub in m.modules():
        if isinstance(sub, nn.Linear):
            last = sub
    return None if last is None else last.out_features


@register_method
class Compacter(Method):
    """Compacter / Compacter++ adapters on whole-output sites (default: after each block's MLP)."""

    name = "compacter"
    config_class = CompacterConfig
    site_kinds = ("linear", "other")
    mergeable = False
    default_targets = ("mlp",)

    def check_site(self, model, spec, site):  # noqa: D102
        super().check_site(model, spec, site)
        if site.out_slice is not None:
            raise ValueError(f"method 'compacter' transforms whole sub-layer outputs; site {site.qualified!r} is a "
                             "slice of a fused projection: use 'mlp', 'attn_out' or 'mlp_out'")
        cfg: CompacterConfig = self.config
        width = self._width(model, spec, site)
        if width % cfg.n:
            divisors = [d for d in range(1, min(width, 64) + 1) if width % d == 0]
            raise ValueError(f"CompacterConfig: site {site.qualified!r} at {site.path!r} has width {width}, which is "
                             f"not divisible by n={cfg.n}; the PHM layers need n | width (divisors of {width}: "
                             f"{divisors}{' ...' if width > 64 else ''})")

    @staticmethod
    def _width(model, spec, site) -> int:
        width = output_width(model.get_submodule(site.path))
        return width if width is not None else spec.towers[site.tower].width

    def build_shared(self, model, spec, sites):  # noqa: D102
        like = next(p for p in model.parameters() if p.is_floating_point())
        return CompacterShared(self.config.n, float(self.config.phm_init_std), like)

    def make_adapter(self, model, spec, sites, module, shared):  # noqa: D102
        cfg: CompacterConfig = self.config
        site = sites[0]
        width = self._width(model, spec, site)
        like = next((p for p in module.parameters() if p.is_floating_point()), shared.phm_rule)
        return CompacterAdapter(site, width, cfg.bottleneck_for(width), cfg, like)
