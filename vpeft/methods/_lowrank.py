"""Shared machinery of the weight-delta family (LoRA, DoRA, Block-LoRA, Comp-LoRA): output slices of a fused
projection, the base weight behind a site, and an adapter base class that adds ``x -> delta(x)`` into slices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

from .base import Adapter, Method, PeftConfig

if TYPE_CHECKING:  # pragma: no cover
    from ..backbones import BackboneSpec, Site
    from .layers import AdapterLayer


@dataclass
class LowRankConfig(PeftConfig):
    """Fields shared by the LoRA family (each method's config subclasses this and sets its paper's defaults).

    Attributes:
        r: Rank of the update.
        alpha: Scale numerator; the update is multiplied by ``alpha / r``. ``None`` means ``alpha = r``.
        dropout: Dropout on the low-rank branch input.
        init_a: ``"kaiming"`` (loralib) or ``"gaussian"`` (N(0, 1/r)) initialisation of the down-projection.
    """

    r: int = 8
    alpha: Optional[float] = None
    dropout: float = 0.0
    init_a: str = "kaiming"

    @property
    def scaling(self) -> float:
        """``alpha / r``."""
        return (self.alpha if self.alpha is not None else self.r) / self.r

    def validate(self) -> None:  # noqa: D102
        super().validate()
        name = type(self).__name__
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"{name}.r must be a positive int, got {self.r!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))):
            raise TypeError(f"{name}.alpha must be a number or None, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{name}.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init_a not in ("kaiming", "gaussian"):
            raise ValueError(f"{name}.init_a must be 'kaiming' or 'gaussian', got {self.init_a!r}")


def site_weight(layer_or_module: nn.Module) -> tuple[nn.Parameter, Optional[nn.Parameter]]:
    """The (weight, bias) whose product with the site input gives the site output: a Linear's
    ``weight``/``bias`` or a packed attention's ``in_proj_weight``/``in_proj_bias`` (output-features first)."""
    from .layers import unwrap

    m = unwrap(layer_or_module)
    if hasattr(m, "in_proj_weight"):
        return m.in_proj_weight, m.in_proj_bias
    return m.weight, m.bias


def slices_of(sites: list[Site], out_features: int) -> dict[str, tuple[int, int]]:
    """Slice name -> (start, stop) for a group of sites on one module; the whole output is ``"w"``."""
    out = {}
    for s in sites:
        if s.out_slice is None:
            return {"w": (0, out_features)}
        out[s.name] = s.out_slice
    return dict(sorted(out.items(), key=lambda kv: kv[1][0]))


def add_into_slices(y: torch.Tensor, slices: dict[str, tuple[int, int]],
                    deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    """``y`` with ``deltas[name]`` added on ``y[..., start:stop]`` for each slice; out of place (autograd-safe)."""
    if "w" in slices:
        return y + deltas["w"]
    parts, pos = [], 0
    for name, (a, b) in slices.items():
        if a > pos:
            parts.append(y[..., pos:a])
        parts.append(y[..., a:b] + deltas[name])
        pos = b
    if pos < y.shape[-1]:
        parts.append(y[..., pos:])
    return torch.cat(parts, dim=-1)


class WeightDeltaMethod(Method):
    """Common resolution for weight-delta methods: Linear sites and the q/k/v slices of packed projections."""

    site_kinds = ("linear", "packed_attn")
    mergeable = True
    default_targets = ("q", "v")

    def check_rank(self, sites: list[Site], module: nn.Module, r: int) -> tuple[dict[str, tuple[int, int]], int]:
        w, _ = site_weight(module)
        slices = slices_of(sites, w.shape[0])
        in_f = w.shape[1]
        for name, (a, b) in slices.items():
            if r > min(in_f, b - a):
                raise ValueError(f"{type(self.config).__name__}: rank r={r} is larger than the layer at "
                                 f"{sites[0].path!r} (slice {name!r}: {b - a} x {in_f}); use r <= {min(in_f, b - a)}")
        return slices, in_f


class SliceDeltaAdapter(Adapter):
    """Adds a low-rank ``scaling * B (A x)`` into each output slice. Subclasses provide ``factors()``."""

    mergeable = True

    def __init__(self, site: Site, slices: dict[str, tuple[int, int]], scaling: float, dropout: float) -> None:
        super().__init__(site)
        self.slices = slices
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Slice name -> (A (r, in), B (out_slice, r))."""
        raise NotImplementedError

    def deltas(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Slice name -> ``scaling * B A x``; the down-projections of all slices run as one matmul over x."""
        f = self.factors()
        names = list(f)
        a_all = torch.cat([f[n][0] for n in names], dim=0) if len(names) > 1 else f[names[0]][0]
        return self._up(self.dropout(x) @ a_all.t(), f)

    def _up(self, h: torch.Tensor, f: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        out, pos = {}, 0
        for n, (a, b) in f.items():
            out[n] = (h[..., pos:pos + a.shape[0]] @ b.t()) * self.scaling
            pos += a.shape[0]
        return out

    def kernel_unsupported(self, base: nn.Module) -> Optional[str]:
        """Why ``vpeft.kernels`` cannot fuse this call with ``base``, or ``None`` when it can."""
        if not isinstance(base, nn.Linear) and not isinstance(getattr(base, "in_proj_weight", None), torch.Tensor):
            return f"the site's module is a {type(base).__name__}, not a Linear or packed attention"
        if self.training and isinstance(self.dropout, nn.Dropout):
            return "dropout on the low-rank branch is active (training with dropout > 0)"
        return None

    def kernel_factors(self) -> tuple[torch.Tensor, torch.Tensor, Optional[list[tuple[int, int]]]]:
        """``(lora_A, lora_B, out_slices)`` in the layout of ``vpeft.kernels.lora_linear``: the slices in output
        order with their A and B stacked (``out_slices=None`` for the whole output)."""
        f = self.factors()
        if "w" in self.slices:
            return f["w"][0], f["w"][1], None
        names = list(self.slices)  # ascending output positions
        if len(names) == 1:
            return f[names[0]][0], f[names[0]][1], [self.slices[names[0]]]
        return (torch.cat([f[n][0] for n in names]), torch.cat([f[n][1] for n in names]),
                [self.slices[n] for n in names])

    def kernel_choice(self, op: str, x: torch.Tensor, base: nn.Module) -> str:
        """Dispatch ``op`` for this call (recorded for ``repr``); raises when Triton is forced but cannot run."""
        from ..kernels._dispatch import choose

        why = self.kernel_unsupported(base)
        backend = choose(op, (x, *site_weight(base)) if why is None else (x,), unsupported=why)
        self.__dict__["kernel_backend"] = backend
        return backend

    def fused_forward(self, x: torch.Tensor, base: nn.Module) -> Optional[torch.Tensor]:
        """``base(x)`` plus the low-rank update in one Triton kernel (``vpeft.kernels.lora_linear``) when the
        kernel dispatch chooses Triton; ``None`` otherwise (the torch path runs)."""
        if self.kernel_choice("lora_linear", x, base) != "triton":
            return None
        from ..kernels.lora import lora_linear

        weight, bias = site_weight(base)
        lora_a, lora_b, out_slices = self.kernel_factors()
        return lora_linear(x, weight, bias, lora_a, lora_b, self.scaling, out_slices=out_slices)

    def extra_repr(self) -> str:
        backend = self.__dict__.get("kernel_backend")
        return f"slices={list(self.slices)}, scaling={self.scaling:g}" + (f", kernel={backend}" if backend else "")

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if type(self).deltas is not SliceDeltaAdapter.deltas:
            return add_into_slices(y, self.slices, self.deltas(x))
        # Plain low-rank factors: the up-projection, the scaling and the add into y run as one GEMM per slice
        # (addmm, beta=1, alpha=scaling) instead of a matmul and two output-sized elementwise passes; autograd keeps
        # the same tensors (the rank-sized h and B).
        f = self.factors()
        names = list(f)
        a_all = torch.cat([f[n][0] for n in names], dim=0) if len(names) > 1 else f[names[0]][0]
        h = self.dropout(x) @ a_all.t()
        if h.dtype != y.dtype:  # mixed dtypes outside autocast: the unfused path's type promotion
            return add_into_slices(y, self.slices, self._up(h, f))
        h2, y2 = h.reshape(-1, h.shape[-1]), y.reshape(-1, y.shape[-1])
        if "w" in self.slices:
            return torch.addmm(y2, h2, f["w"][1].t(), alpha=self.scaling).view(y.shape)
        rank_at, rpos = {}, 0  # where each slice's rank block sits in h (the order of factors())
        for n in names:
            rank_at[n], rpos = rpos, rpos + f[n][0].shape[0]
        parts, pos = [], 0
        for n, (lo, hi) in self.slices.items():  # ascending output positions
            a, b = f[n]
            if lo > pos:
                parts.append(y2[:, pos:lo])
            h_n = h2[:, rank_at[n]:rank_at[n] + a.shape[0]]
            parts.append(torch.addmm(y2[:, lo:hi], h_n, b.t(), alpha=self.scaling))
            pos = hi
        if pos < y2.shape[-1]:
            parts.append(y2[:, pos:])
        return torch.cat(parts, dim=-1).view(y.shape)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        """Slice name -> ``scaling * B @ A`` (out_slice, in)."""
        return {n: (b @ a) * self.scaling for n, (a, b) in self.factors().items()}

    def _apply_delta(self, layer: AdapterLayer, sign: float) -> None:
        w, _ = site_weight(layer)
        for n, d in self.delta_weight().items():
            a, b = self.slices[n]
            w.data[a:b] += sign * d.to(w.dtype)

    def merge(self, layer: AdapterLayer) -> None:  # noqa: D102
        self._apply_delta(layer, 1.0)

    def unmerge(self, layer: AdapterLayer) -> None:  # noqa: D102
        self._apply_delta(layer, -1.0)


def spec_width(spec: BackboneSpec, site: Site) -> int:
    """Token width of the tower a site belongs to."""
    return spec.towers[site.tower].width
