"""Bias and normalisation tuning: BitFit, LayerNorm tuning, DiffFit.

* BitFit (Ben Zaken et al., ACL 2022, arXiv:2106.10199): train only the bias terms.
* LN-Tune (LayerNorm affine tuning, as in "Tuning LayerNorm in Attention", Zhao et al., arXiv:2312.11420):
  train only the LayerNorm weights and biases.
* DiffFit (Xie et al., ICCV 2023, arXiv:2304.06648): bias terms, LayerNorms, and a learnable per-channel scale
  factor ``gamma`` (initialised to 1) on the attention and MLP branches of every block
  (``x + gamma_1 * attn(...)``, ``x + gamma_2 * mlp(...)``).

All three are stored as *deltas* on the frozen values (zero-initialised; ``gamma`` as a multiplicative factor), so
only adapter tensors train and the adapter file is separable; merging adds the deltas into the backbone exactly.

Trainable parameters (ViT, depth L, width d, MLP hidden h, all Linear layers with bias):
    * BitFit: ``L * (3d + d + h + d + 2d) + 2d`` (qkv, attn_out, mlp_in, mlp_out, norm1, norm2 biases; final norm
      and patch-embedding biases). ViT-B/16: 12 * 8448 + 1536 = 102,912.
    * LN-Tune: ``2 * (2L + 1) * d`` (norm1, norm2, final_norm). ViT-B/16: 38,400.
    * DiffFit: BitFit's linear biases + LN-Tune + ``2 * L * d`` gammas.

Deviations from the reference implementations:
    * BitFit adds a zero-initialised bias delta instead of unfreezing the original bias; same function and
      gradients, but the base weights stay untouched until ``merge``. Sites without a bias are skipped by the
      default placement (BitFit tunes existing biases only).
    * DiffFit's DiT-specific parts (class embedding, the resolution-dependent gamma placement) do not apply to
      ViTs and are left out; gamma multiplies the branch output before any LayerScale (both per-channel, so they
      commute).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Adapter, Method, PeftConfig, register_method
from .ssf import _AFFINE_KINDS, AffineAdapter, channels_of, check_whole_output, default_affine_targets


def _has_bias(model: nn.Module, path: str) -> bool:
    from ._lowrank import site_weight
    from .layers import unwrap

    m = unwrap(model.get_submodule(path))
    if hasattr(m, "in_proj_weight"):
        return site_weight(m)[1] is not None
    return isinstance(getattr(m, "bias", None), torch.Tensor)


class _BiasFamily(Method):
    site_kinds = _AFFINE_KINDS
    mergeable = True
    _defaults: tuple[str, ...] = ()

    def resolve(self, model, spec):  # noqa: D102
        self._model = model
        sites = super().resolve(model, spec)
        if self.config.targets is None:  # paper placement: existing biases only
            sites = [s for s in sites if _has_bias(model, s.path)]
        return sites

    def targets(self, spec):  # noqa: D102
        if self.config.targets is not None:
            return list(self.config.targets)
        return default_affine_targets(spec, self.config.towers, self.default_targets, self._model)

    def check_site(self, model, spec, site):  # noqa: D102
        super().check_site(model, spec, site)
        check_whole_output(self.name, site)


class LNTuneAdapter(Adapter):
    """Exact LayerNorm affine tuning: ``y + norm(x) * delta_weight + delta_bias`` where ``y = norm(x) * w + b``."""

    mergeable = True

    def __init__(self, site, module: nn.Module) -> None:
        super().__init__(site)
        from .layers import unwrap

        m = unwrap(module)
        if not isinstance(m, nn.LayerNorm) or m.weight is None:
            raise ValueError(f"LN tuning needs a LayerNorm with affine parameters at {site.path!r}, found "
                             f"{type(m).__name__}")
        self.normalized_shape, self.eps = m.normalized_shape, m.eps
        self.delta_weight = nn.Parameter(torch.zeros_like(m.weight))
        self.delta_bias = nn.Parameter(torch.zeros_like(m.weight))

    def forward(self, x, y):  # noqa: D102
        xhat = F.layer_norm(x.to(self.delta_weight.dtype), self.normalized_shape, None, None, self.eps)
        return y + (xhat * self.delta_weight + self.delta_bias).to(y.dtype)

    def _params(self, layer):
        from .layers import unwrap

        m = unwrap(layer)
        return m.weight, m.bias

    def merge(self, layer):  # noqa: D102
        w, b = self._params(layer)
        w.data.add_(self.delta_weight.to(w.dtype))
        b.data.add_(self.delta_bias.to(b.dtype))

    def unmerge(self, layer):  # noqa: D102
        w, b = self._params(layer)
        w.data.sub_(self.delta_weight.to(w.dtype))
        b.data.sub_(self.delta_bias.to(b.dtype))


@dataclass
class BitFitConfig(PeftConfig):
    """BitFit configuration. ``targets`` default: embed, qkv, attn_out, mlp_in, mlp_out, norm1, norm2, final_norm
    (each only where the module has a bias)."""


@dataclass
class LNTuneConfig(PeftConfig):
    """LayerNorm tuning configuration. ``targets`` default: norm1, norm2, final_norm."""


@dataclass
class DiffFitConfig(PeftConfig):
    """DiffFit configuration. ``targets`` default: BitFit's sites; ``gamma`` goes on attn_out and mlp_out.

    Attributes:
        gamma_init: Initial value of the branch scale factors (paper: 1.0).
    """

    gamma_init: float = 1.0


_BIAS_SITES = ("embed", "qkv", "attn_out", "mlp_in", "mlp_out", "norm1", "norm2", "final_norm")


@register_method
class BitFit(_BiasFamily):
    """BitFit: bias deltas on every biased Linear, LayerNorm and patch projection."""

    name = "bitfit"
    config_class = BitFitConfig
    default_targets = _BIAS_SITES

    def make_adapter(self, model, spec, sites, module, shared):  # noqa: D102
        c, dim = channels_of(spec, sites[0], module)
        return AffineAdapter(sites[0], module, c, dim, None, (0.0, 0.0))


@register_method
class LNTune(_BiasFamily):
    """LayerNorm affine tuning."""

    name = "ln_tune"
    config_class = LNTuneConfig
    site_kinds = ("norm",)
    default_targets = ("norm1", "norm2", "final_norm")

    def make_adapter(self, model, spec, sites, module, shared):  # noqa: D102
        return LNTuneAdapter(sites[0], module)


@register_method
class DiffFit(_BiasFamily):
    """DiffFit: biases + LayerNorms + branch scale factors."""

    name = "difffit"
    config_class = DiffFitConfig
    default_targets = _BIAS_SITES

    def make_adapter(self, model, spec, sites, module, shared):  # noqa: D102
        site = sites[0]
        if site.kind == "norm":
            return LNTuneAdapter(site, module)
        c, dim = channels_of(spec, site, module)
        scale = (self.config.gamma_init, 0.0) if site.name in ("attn_out", "mlp_out") else None
        return AffineAdapter(site, module, c, dim, scale, (0.0, 0.0))
