"""SSF: Scaling & Shifting your Features (Lian et al., NeurIPS 2022, arXiv:2210.08823).

After each operation a per-channel affine ``y * gamma + beta`` is applied. Both are linear in ``y``, so after
training they fold into the preceding Linear / LayerNorm / conv (``W' = gamma W``, ``b' = gamma b + beta``) and
inference costs exactly the backbone's FLOPs.

Placement (the paper's "after MSA, MLP and LN", as in the official ViT code): the patch-embedding projection
(``embed``), the fused ``qkv`` projection, ``attn_out``, ``mlp_in``, ``mlp_out``, ``norm1``, ``norm2`` and the
``final_norm``. Initialisation as in the paper: ``gamma ~ N(1, 0.02)``, ``beta ~ N(0, 0.02)``.

Trainable parameters (ViT with depth L, width d, MLP hidden h): ``2 * (L * (3d + d + h + d + d + d) + d + d)``:
per block the qkv, attn_out, mlp_in, mlp_out, norm1, norm2 outputs, plus final_norm and the patch embedding.
ViT-B/16 (L=12, d=768, h=3072): ``2 * (12 * 8448 + 1536) = 205,824`` (the paper reports 0.21M).

Deviations from the reference implementation (dongzelian/SSF):
    * The reference inserts SSF inside timm modules by editing their forward; here SSF is an adapter at spec
      sites, so it attaches to any backbone with a spec (open_clip included) and merges through one code path.
    * Where the patch embedding has no bias (open_clip's ``conv1``) its ``beta`` could not be folded into the
      weights, so the default placement leaves out ``embed`` there (it stays available as an explicit target, then
      unmergeable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .base import Adapter, Method, PeftConfig, register_method


class AffineAdapter(Adapter):
    """``y * scale + shift`` along the site's channel dimension; either part may be absent.

    Mergeable into Linear / packed projections / LayerNorm / conv / embedding when the shift has a bias to go to.
    """

    def __init__(self, site, module: nn.Module, channels: int, channel_dim: int, scale_init: Optional[tuple],
                 shift_init: Optional[tuple]) -> None:
        super().__init__(site)
        from ._lowrank import site_weight

        self.channel_dim = channel_dim
        w = _weight_of(module)
        kw = dict(device=w.device, dtype=w.dtype)
        self.scale = self.shift = None
        if scale_init is not None:
            self.scale = nn.Parameter(torch.empty(channels, **kw).normal_(*scale_init) if scale_init[1] > 0
                                      else torch.full((channels,), float(scale_init[0]), **kw))
        if shift_init is not None:
            self.shift = nn.Parameter(torch.empty(channels, **kw).normal_(*shift_init) if shift_init[1] > 0
                                      else torch.full((channels,), float(shift_init[0]), **kw))
        kind = site.kind
        has_bias = (site_weight(module)[1] if kind in ("linear", "packed_attn") else getattr(module, "bias", None))
        self.mergeable = kind == "embed" or shift_init is None or has_bias is not None
        if kind == "norm" and getattr(module, "weight", None) is None:
            self.mergeable = False

    def _view(self, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.channel_dim in (-1, y.dim() - 1):
            return p
        shape = [1] * y.dim()
        shape[self.channel_dim] = -1
        return p.view(shape)

    def fused_forward(self, x: torch.Tensor, base: nn.Module) -> Optional[torch.Tensor]:
        """LayerNorm then scale and shift in one Triton kernel (``vpeft.kernels.ssf_layernorm``) on norm sites when
        the kernel dispatch chooses Triton; ``None`` otherwise (the torch path runs)."""
        if self.site.kind != "norm":
            return None  # only the norm sites have a fused kernel; other sites keep the torch path in every mode
        from ..kernels._dispatch import choose

        why = None
        if not isinstance(base, nn.LayerNorm) or len(base.normalized_shape) != 1:
            why = f"the norm is a {type(base).__name__}, not a LayerNorm over the last dimension"
        elif self.channel_dim not in (-1, x.dim() - 1):
            why = "the scale and shift are not on the last dimension"
        ref = self.scale if self.scale is not None else self.shift
        self.__dict__["kernel_backend"] = choose("ssf_layernorm", (x, ref), unsupported=why)
        if self.kernel_backend != "triton":
            return None
        from ..kernels.ssf import ssf_layernorm

        scale = self.scale if self.scale is not None else torch.ones_like(ref)
        shift = self.shift if self.shift is not None else torch.zeros_like(ref)
        return ssf_layernorm(x, base.weight, base.bias, scale, shift, base.eps)

    def extra_repr(self) -> str:
        backend = self.__dict__.get("kernel_backend")
        return f"site={self.site.qualified!r}" + (f", kernel={backend}" if backend else "")

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.scale is not None:
            y = y * self._view(self.scale, y)
        if self.shift is not None:
            y = y + self._view(self.shift, y)
        return y

    def _params(self, layer):
        from ._lowrank import site_weight

        if self.site.kind in ("linear", "packed_attn"):
            return site_weight(layer)
        m = _unwrap(layer)
        return m.weight, getattr(m, "bias", None)

    def merge(self, layer) -> None:  # noqa: D102
        w, b = self._params(layer)
        one = torch.ones_like(w[0] if self.site.kind == "embed" else w.reshape(w.shape[0], -1)[:, 0])
        s = self.scale.to(w.dtype) if self.scale is not None else one
        t = self.shift.to(w.dtype) if self.shift is not None else None
        if self.site.kind == "embed":  # Embedding rows are tokens; channels are columns
            w.data.mul_(s)
            if t is not None:
                w.data.add_(t)
            return
        w.data.mul_(s.view(-1, *([1] * (w.dim() - 1))))
        if b is not None:
            b.data.mul_(s)
            if t is not None:
                b.data.add_(t)

    def unmerge(self, layer) -> None:  # noqa: D102
        w, b = self._params(layer)
        s = self.scale.to(w.dtype) if self.scale is not None else None
        t = self.shift.to(w.dtype) if self.shift is not None else None
        if self.site.kind == "embed":
            if t is not None:
                w.data.sub_(t)
            if s is not None:
                w.data.div_(s)
            return
        if b is not None:
            if t is not None:
                b.data.sub_(t)
            if s is not None:
                b.data.div_(s)
        if s is not None:
            w.data.div_(s.view(-1, *([1] * (w.dim() - 1))))


def _unwrap(m: nn.Module) -> nn.Module:
    from .layers import unwrap

    return unwrap(m)


def _weight_of(module: nn.Module) -> torch.Tensor:
    m = _unwrap(module)
    for name in ("in_proj_weight", "weight"):
        w = getattr(m, name, None)
        if isinstance(w, torch.Tensor):
            return w
    return next(m.parameters())


def channels_of(spec, site, module: nn.Module) -> tuple[int, int]:
    """(channels, channel_dim) of a site's output."""
    m = _unwrap(module)
    if site.kind == "embed":
        return m.weight.shape[1], -1
    if site.kind == "conv":
        return m.weight.shape[0], spec.towers[site.tower].embed_channel_dim
    if site.kind in ("linear", "packed_attn"):
        w = _weight_of(m)
        return w.shape[0], -1
    if site.kind == "norm":
        return spec.towers[site.tower].width if m.weight is None else m.weight.shape[0], -1
    raise ValueError(f"site {site.qualified!r} at {site.path!r} ({type(m).__name__}) has no channel layout for an "
                     "affine adapter")


def check_whole_output(method: str, site) -> None:
    """Affine adapters act on a module's whole output: refuse q/k/v slices."""
    if site.out_slice is not None:
        raise ValueError(f"method {method!r} acts on whole module outputs; site {site.qualified!r} is a slice of a "
                         f"fused projection: target 'qkv' instead")


@dataclass
class SSFConfig(PeftConfig):
    """SSF configuration.

    Attributes:
        init_std: Standard deviation of the N(1, std) scale and N(0, std) shift initialisation (paper: 0.02).
        targets: Sites (default: embed, qkv, attn_out, mlp_in, mlp_out, norm1, norm2, final_norm).
    """

    init_std: float = 0.02

    def validate(self) -> None:  # noqa: D102
        super().validate()
        if not self.init_std >= 0:
            raise ValueError(f"SSFConfig.init_std must be >= 0, got {self.init_std!r}")


_AFFINE_KINDS = ("linear", "packed_attn", "norm", "conv", "embed")


def default_affine_targets(spec, towers, names: tuple[str, ...], model: nn.Module) -> list[str]:
    """The paper-default placement ``names``, less what this backbone cannot merge or does not have.

    Dropped: sites some selected tower lacks (SAM's encoder has no ``final_norm``: its neck normalises channel-first
    maps), and Linear / packed-projection / patch-conv sites without a bias (a shift there could not be folded into
    the weights: open_clip's bias-free patch conv, Point-MAE's bias-free ``qkv``). Explicit targets are never
    filtered: a missing site there is an error, an unmergeable one trains and refuses ``merge``.
    """
    from ._lowrank import site_weight

    tnames = list(towers if towers is not None else spec.default_towers)
    out = [n for n in names if all(n in spec.towers[t].site_names() for t in tnames)]

    def has_bias(site) -> bool:
        m = model.get_submodule(site.path)
        if site.kind in ("linear", "packed_attn"):
            return site_weight(m)[1] is not None
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            return m.bias is not None
        return True

    return [n for n in out if all(has_bias(site) for site in spec.resolve(model, n, towers=tnames))]


@register_method
class SSF(Method):
    """SSF: per-channel scale and shift after each operation."""

    name = "ssf"
    config_class = SSFConfig
    site_kinds = _AFFINE_KINDS
    mergeable = True
    default_targets = ("embed", "qkv", "attn_out", "mlp_in", "mlp_out", "norm1", "norm2", "final_norm")

    def targets(self, spec):  # noqa: D102
        if self.config.targets is not None:
            return list(self.config.targets)
        return default_affine_targets(spec, self.config.towers, self.default_targets, self._model)

    def resolve(self, model, spec):  # noqa: D102
        self._model = model
        return super().resolve(model, spec)

    def check_site(self, model, spec, site):  # noqa: D102
        super().check_site(model, spec, site)
        check_whole_output(self.name, site)

    def make_adapter(self, model, spec, sites, module, shared):  # noqa: D102
        site = sites[0]
        c, dim = channels_of(spec, site, module)
        std = self.config.init_std
        return AffineAdapter(site, module, c, dim, (1.0, std), (0.0, std))
