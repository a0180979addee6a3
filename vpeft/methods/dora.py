"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., ICML 2024, arXiv:2402.09353).

DoRA splits a pretrained weight into a per-output-channel magnitude and a direction, trains the magnitude directly
and the direction through LoRA:

    W' = m * (W + s B A) / ||W + s B A||_c,      s = alpha / r,

where ``||.||_c`` is the L2 norm of each output row (over the input dimension; the paper's "column" norm with its
transposed convention), ``m`` is initialised to ``||W||_c`` and ``B`` to zero, so training starts from the
pretrained function. Following the paper's "reduction of training overhead" (Sec. 4.3), the norm is treated as a
constant in backward: it is computed under ``no_grad`` each forward and gets no gradient.

On timm's fused ``qkv`` Linear and open_clip's packed ``in_proj_weight`` each targeted q/k/v slice has its own
``A``, ``B`` and magnitude (over that slice's output rows), exactly as if the three projections were separate
Linears. The adapter works on the site output ``y = W x + b`` it is handed:

    y_slice' = (m / n) * (y_slice - b_slice + s B A x) + b_slice,      n = ||W_slice + s B A||_c (detached)

so the frozen matmul runs once, as in LoRA. A custom autograd function keeps only what LoRA keeps (``x`` and
``A x``) plus per-channel vectors: the output-sized term ``z = W x + s B A x`` that the magnitude's gradient needs is
recomputed in backward (one slice-sized matmul) instead of being saved per adapted slice. No weight-sized tensor is
saved either: ``W + s B A`` exists only transiently inside the ``no_grad`` norm. HF peft's DoRA keeps more than full
fine-tuning on the same model; ``python -m benchmarks.dora_memory`` prints the figures.

Paper defaults: DoRA keeps LoRA's recipe (Kaiming-uniform ``A``, zero ``B``, ``alpha / r`` scaling) and adds only
the magnitude; its LLaMA commonsense runs use r=32, alpha=64, dropout 0.05 on q, k, v, up and down projections
(DoRA-dagger halves r). The paper has no ViT image-classification runs, so vpeft's defaults are LoRA's (targets
q and v, r=8, alpha = r, no dropout), which makes a DoRA config a drop-in replacement for a LoRA config.

Trainable parameters: LoRA's plus the magnitude, i.e. for each adapted slice ``r * (in + out_slice) + out_slice``;
DoRA r=8 on q and v of ViT-B/16: ``12 * 2 * (8 * (768 + 768) + 768) = 313,344``.

Merging folds ``W_slice <- (m / n) * (W_slice + s B A)`` (bias unchanged); the row norms ``n`` and magnitudes used
are kept (out_slice values, not in the adapter state dict) so that unmerge inverts it exactly up to rounding.

Deviations from the reference implementation (NVlabs/DoRA, built on HF peft's LoRA):
    * The magnitude is per q/k/v slice on fused projections; HF peft targeting timm's fused ``qkv`` Linear has
      one magnitude over all three (and adapts k too). On plain Linear sites the two are the same.
    * The rescale acts on the base layer's output ``y`` instead of re-running the frozen matmul, so the frozen
      weight is applied once. With dropout > 0 the reference code feeds the dropped input through the frozen
      weight inside the rescaled term; here (as in HF peft) only the LoRA branch sees dropout. Identical for
      dropout = 0.
    * The norm is computed in float32 whatever the weight dtype, and clamped at float32's smallest normal number
      so an all-zero row (m = 0) gives 0 instead of 0 / 0.
    * DoRA must be the first method on its sites (``get_peft_model`` refuses another method before it): its norm
      is that of the base weight, so an earlier method's change to ``y`` would be rescaled with a norm that does
      not include it, and merging would not reproduce the forward. Methods after DoRA (e.g. SSF) are fine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

from ._lowrank import LowRankConfig, SliceDeltaAdapter, WeightDeltaMethod, site_weight
from .base import register_method
from .lora import init_lora_a

if TYPE_CHECKING:  # pragma: no cover
    from .layers import AdapterLayer

_TINY = torch.finfo(torch.float32).tiny


@dataclass
class DoRAConfig(LowRankConfig):
    """DoRA configuration (LoRA's fields; the magnitude has no options).

    Attributes:
        r: Rank of the directional update.
        alpha: Scale numerator; the update is multiplied by ``alpha / r``. ``None`` means ``alpha = r``.
        dropout: Dropout on the LoRA branch input.
        init_a: ``"kaiming"`` (loralib / paper) or ``"gaussian"`` (N(0, 1/r)) initialisation of ``A``.
        targets: Sites among ``q, k, v, qkv, attn_out, mlp_in, mlp_out`` (default ``["q", "v"]``).
    """

    # LoRA's fields and defaults (LowRankConfig); the magnitude has no options.


class DoRAAdapter(SliceDeltaAdapter):
    """Per output slice: ``lora_A.<slice>`` (r, in), ``lora_B.<slice>`` (out_slice, r) and
    ``magnitude.<slice>`` (out_slice,).

    The base module (the Linear or packed attention whose weight is adapted) is referenced, not registered, so
    its weight stays out of the adapter's parameters and state dict; the norm reads it at every forward.
    """

    must_be_first = True

    def __init__(self, site, slices, in_features: int, cfg: DoRAConfig, base: nn.Module) -> None:
        super().__init__(site, slices, cfg.scaling, cfg.dropout)
        self.__dict__["_base"] = base
        weight, _ = site_weight(base)
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (a, b) in slices.items():
            A = torch.empty(cfg.r, in_features, **kw)
            init_lora_a(A, cfg.init_a, cfg.r)
            self.lora_A[name] = nn.Parameter(A)
            self.lora_B[name] = nn.Parameter(torch.zeros(b - a, cfg.r, **kw))
        # Same code path as the forward's norm, so that m / n is exactly 1 at initialisation.
        norms = self.row_norms(weight)
        self.magnitude = nn.ParameterDict({n: nn.Parameter(v.to(weight.dtype)) for n, v in norms.items()})
        self._merged: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def factors(self):  # noqa: D102
        return {n: (self.lora_A[n], self.lora_B[n]) for n in self.slices}

    @torch.no_grad()
    def row_norms(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Slice name -> ``||W_slice + s B A||`` per output row (float32, detached, clamped away from 0)."""
        out = {}
        for n, (a, b) in self.factors().items():
            lo, hi = self.slices[n]
            v = torch.addmm(weight[lo:hi].float(), b.float(), a.float(), alpha=self.scaling)
            out[n] = torch.linalg.vector_norm(v, dim=1).clamp_min_(_TINY)
        return out

    def fused_forward(self, x: torch.Tensor, base: nn.Module) -> Optional[torch.Tensor]:
        """``base(x)`` with DoRA applied in one Triton kernel (``vpeft.kernels.dora_linear``) when the kernel
        dispatch chooses Triton; ``None`` otherwise (the torch path runs)."""
        if self.kernel_choice("dora_linear", x, base) != "triton":
            return None
        from ..kernels.dora import dora_linear

        weight, bias = site_weight(base)
        lora_a, lora_b, out_slices = self.kernel_factors()
        names = list(self.slices)
        magnitude = torch.cat([self.magnitude[n] for n in names]) if len(names) > 1 else self.magnitude[names[0]]
        return dora_linear(x, weight, bias, lora_a, lora_b, magnitude, self.scaling, out_slices=out_slices)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: D102
        weight, bias = site_weight(self._base)
        inv_norms = {n: v.reciprocal_() for n, v in self.row_norms(weight).items()}
        f = self.factors()
        names = list(f)
        a_all = torch.cat([f[n][0] for n in names], dim=0) if len(names) > 1 else f[names[0]][0]
        h = self.dropout(x) @ a_all.t()  # the down-projections of all slices in one matmul, as LoRA
        parts, pos, col = [], 0, 0
        for name, (a, b) in self.slices.items():
            if a > pos:
                parts.append(y[..., pos:a])
            lora_b = f[name][1]
            xa = h[..., col:col + lora_b.shape[1]]
            col += lora_b.shape[1]
            b_slice = bias[a:b] if bias is not None else None
            parts.append(_DoRAScale.apply(y[..., a:b], xa, lora_b, self.magnitude[name], inv_norms[name], x,
                                          weight[a:b], b_slice, self.scaling))
            pos = b
        if pos < y.shape[-1]:
            parts.append(y[..., pos:])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    @torch.no_grad()
    def merge(self, layer: AdapterLayer) -> None:  # noqa: D102
        weight, _ = site_weight(layer)
        norms = self.row_norms(weight)
        for n, (A, B) in self.factors().items():
            lo, hi = self.slices[n]
            m = self.magnitude[n].detach().float().clone()
            dead = (m == 0).nonzero().flatten()  # rows the inverse cannot recover from m / n = 0
            kept = weight[lo:hi][dead].clone()
            v = torch.addmm(weight[lo:hi].float(), B.float(), A.float(), alpha=self.scaling)
            weight.data[lo:hi] = (v * (m / norms[n]).unsqueeze(1)).to(weight.dtype)
            self._merged[n] = (norms[n], m, dead, kept)

    @torch.no_grad()
    def unmerge(self, layer: AdapterLayer) -> None:  # noqa: D102
        weight, _ = site_weight(layer)
        for n, (A, B) in self.factors().items():
            lo, hi = self.slices[n]
            norm, m, dead, kept = self._merged.pop(n)
            ratio = torch.where(m == 0, torch.zeros_like(norm), norm / m)
            v = torch.addmm(weight[lo:hi].float() * ratio.unsqueeze(1), B.float(), A.float(), alpha=-self.scaling)
            v[dead] = kept.float()
            weight.data[lo:hi] = v.to(weight.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        """Slice name -> ``W'_slice - W_slice`` (out_slice, in) for the current base weight (not additive:
        the rescale depends on the weight it is applied to)."""
        weight, _ = site_weight(self._base)
        norms = self.row_norms(weight)
        out = {}
        for n, (A, B) in self.factors().items():
            lo, hi = self.slices[n]
            w = weight[lo:hi].float()
            v = torch.addmm(w, B.float(), A.float(), alpha=self.scaling)
            out[n] = (v * (self.magnitude[n].float() / norms[n]).unsqueeze(1) - w).to(weight.dtype)
        return out


class _DoRAScale(torch.autograd.Function):
    """``out = (y - b + s B (A x)) * m / n + b`` for one output slice, saving no output-sized tensor.

    The magnitude's gradient needs ``z = y - b + s B A x = W x + s B A x`` (output-sized). Plain autograd would keep
    ``z`` for every adapted slice (about LoRA's whole activation cost again); here backward recomputes it from what
    LoRA keeps anyway (the site input ``x`` and the rank-``r`` ``A x``) and the resident frozen weight, at the cost
    of one slice-sized matmul in backward. The norm ``n`` is a constant (the paper's Sec. 4.3).
    """

    @staticmethod
    def forward(ctx, y, xa, lora_b, magnitude, inv_norm, x, weight, bias, scaling):  # noqa: D102
        scale = (magnitude * inv_norm.to(magnitude.dtype)).to(y.dtype)
        z = y + (xa @ lora_b.t()) * scaling
        if bias is not None:
            b = bias.to(y.dtype)
            out = torch.addcmul(b, z - b, scale)
        else:
            out = z * scale
        ctx.save_for_backward(xa, lora_b, magnitude, inv_norm, x, weight)
        ctx.scaling = scaling
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        xa, lora_b, magnitude, inv_norm, x, weight = ctx.saved_tensors
        s = ctx.scaling
        scale = (magnitude * inv_norm.to(magnitude.dtype)).to(g.dtype)
        dz = g * scale
        need = ctx.needs_input_grad
        grad_y = dz if need[0] else None
        grad_xa = (dz @ lora_b) * s if need[1] else None
        grad_b = None
        if need[2]:
            grad_b = (dz.reshape(-1, dz.shape[-1]).t() @ xa.reshape(-1, xa.shape[-1])) * s
        grad_m = None
        if need[3]:
            z = x.to(weight.dtype) @ weight.t() + (xa @ lora_b.t()) * s  # W x + s B A x, recomputed
            grad_m = ((g * z.to(g.dtype)).reshape(-1, g.shape[-1]).sum(0) * inv_norm.to(g.dtype)).to(magnitude.dtype)
        # out = z * scale + bias * (1 - scale): y already carries bias (its gradient reaches the bias through
        # grad_y), so the direct term is the rest, and a trainable bias gets sum(g) in total, as without DoRA's scale.
        grad_bias = None
        if need[7]:
            grad_bias = (g * (1 - scale)).reshape(-1, g.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_y, grad_xa, grad_b, grad_m, None, None, None, grad_bias, None


@register_method
class DoRA(WeightDeltaMethod):
    """DoRA on Linear sites and q/k/v slices of fused or packed projections."""

    name = "dora"
    config_class = DoRAConfig

    def make_adapter(self, model, spec, sites, module, shared):  # noqa: D102
        slices, in_f = self.check_rank(sites, module, self.config.r)
        return DoRAAdapter(sites[0], slices, in_f, self.config, module)
