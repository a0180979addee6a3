"""Earth-Adapter: a mixture of frequency adapters (Hu, Gong, Wang, Jia, Luo and Yang, "Earth-Adapter: Bridge the
Geospatial Domain Gaps with Mixture of Frequency Adaptation", arXiv:2504.06220, 2025; AAAI 2026).

After each transformer block the patch tokens ``T`` (``H x W`` grid, ``C`` channels) are split by a 2-D discrete
Fourier transform over the patch grid into a low-frequency and a high-frequency part. Three bottleneck adapters
("experts") refine the spatial features and the two frequency parts, and a router weighs the experts per token::

    T_low  = IDFT2(M * DFT2(T))           M(u, v) = 1 if |u| <= floor(rho H / 2) and |v| <= floor(rho W / 2)
    T_high = T - T_low                    (= IDFT2((1 - M) * DFT2(T)))
    A_e(z) = W_up,e ReLU(W_down,e z + b_down,e) + b_up,e          e in {spatial, low, high}
    w      = softmax(W_r T + b_r)         (one weight per expert and token; the router reads the spatial tokens)
    T'     = T + s * (w_spatial A_spatial(T) + w_low A_low(T_low) + w_high A_high(T_high))

``u, v`` are signed frequency indices (``0`` is the mean over the grid), ``rho`` is the cut-off ratio and ``s`` a
learnable scale per block. The DFT is a real FFT (``torch.fft.rfft2`` / ``irfft2``) over the grid axes, per channel.
Prefix tokens (class and register tokens, ``num_prefix_tokens`` of the backbone spec) have no grid position: they
are left out of the DFT and pass through unchanged, as the class token does in the reference code. The grid is the
tower's ``grid_size`` (timm ``patch_embed.grid_size``, open_clip ``visual.grid_size``) when the token count fits it,
else the square grid of that many tokens; other token counts (e.g. after patch dropout) raise ``ValueError``.

Placement: on block outputs (the ``block`` site's output, i.e. between blocks), every block by default. Text towers
are refused: the method is defined on image feature maps, and a low-pass over a causal token sequence would mix later
tokens (and the padding after the end-of-text token that CLIP pools) into earlier ones.

Defaults (official code, ``earth_adapter/models/backbones/earth_adapter.py`` and the benchmark configs): bottleneck
``dim = 16`` (the SS configs and the R2U domain-adaptation config; other benchmarks use 24-64), cut-off ratio
``rho = 0.3``, the three experts spatial/low/high with a per-token linear softmax router, ReLU bottlenecks with
PyTorch's default Linear initialisation (so the adapter is not the identity at init), output scale ``s = 0.1``.

Trainable parameters (width ``C``, bottleneck ``r``, ``E`` experts, ``n`` adapted blocks)::

    per block   E (2 C r + r + C)  +  [E > 1] E (C + 1)  +  1
                experts               router                scale

Blocks outside ``frequency_layers`` (when it is set) carry the spatial expert alone: ``2 C r + r + C + 1``.
ViT-B/16 (``C = 768``), ``r = 16``, ``E = 3``, all 12 blocks: ``12 * (3 * 25,360 + 2,307 + 1) = 940,656``.

Not mergeable: the router and the expert inputs depend on the tokens, and the bottlenecks are non-linear.

Deviations from the reference implementation (VisionXLab/Earth-Adapter; DINOv2-L, 1024 channels, 32x32 grid):
    * Only the paper's abstract was available here; the formula above, the placement and the defaults were read off
      the reference code.
    * Cut-off mask: a box symmetric about the zero frequency, ``|k| <= floor(rho n / 2)`` on each axis with that
      axis's own length ``n``. The reference masks the fft-shifted spectrum of a complex FFT with the box
      ``[n/2 - c, n/2 + c)`` (``c = floor(rho min(H, W) / 2)``, one bin more on the negative side) and keeps the real
      part of the inverse, which halves the weight of the one-sided edge bins; with ``c = 0`` (small grids) its low
      band is empty, where here it keeps the mean. The symmetric mask is what a real FFT can represent exactly.
    * ``T_high = T - T_low`` instead of a second inverse FFT (the same value up to rounding; one FFT saved).
    * The FFT runs in float32 for half-precision inputs (``torch.fft`` has no bfloat16 and no CPU float16).
    * Mixture placement: by default every adapted block runs the full mixture, as the method is described. The
      official benchmark configs restrict the frequency experts to some blocks (the last 3 or 6, or the first 6, of
      24 in the DA/DG configs; none in the SS configs) and keep a spatial adapter alone on the others;
      ``frequency_layers`` reproduces that (``[]``: spatial adapters alone, as in the SS configs).
    * All prefix tokens (class and registers) pass through; no width, depth or grid is hard-coded; the reference's
      unused per-layer LayerNorms and its optional learnable tokens (``with_token``, off in every config) are left
      out. ``zero_init=True`` (zero up-projections: identity at init) is an option the paper does not have.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Adapter, Method, PeftConfig, register_method

#: The paper's experts, in routing order.
EXPERTS = ("spatial", "low", "high")


@dataclass
class EarthAdapterConfig(PeftConfig):
    """Earth-Adapter configuration.

    Attributes:
        dim: Bottleneck width of every expert adapter (official configs: 16 for SS and R2U DA; 24-64 elsewhere).
        cutoff_ratio: Cut-off ``rho`` in (0, 1]: the low band keeps the frequencies ``|k| <= floor(rho n / 2)`` on
            each grid axis of length ``n`` (official code: 0.3). 1 keeps every frequency in the low band.
        experts: Experts of the mixture, a subset of ``["spatial", "low", "high"]`` (paper: all three). With a
            single expert there is no router.
        frequency_layers: Blocks (indices into the tower, negative from the end) that run the full mixture; the other
            adapted blocks get the spatial expert alone (the official benchmark configs). ``None``: every adapted
            block runs the mixture.
        scale: Initial value of the learnable per-block output scale ``s`` (official code: 0.1).
        zero_init: Zero the experts' up-projections so that the adapter starts as the identity (not in the paper,
            whose adapters use PyTorch's default Linear initialisation).
        layers: Blocks that get an adapter (default all).
        targets: ``None`` or ``["block"]`` (the adapter acts on block outputs).
    """

    dim: int = 16
    cutoff_ratio: float = 0.3
    experts: list[str] = field(default_factory=lambda: list(EXPERTS))
    frequency_layers: Optional[list[int]] = None
    scale: float = 0.1
    zero_init: bool = False

    def validate(self) -> None:  # noqa: D102
        super().validate()
        name = type(self).__name__
        if not isinstance(self.dim, int) or isinstance(self.dim, bool) or self.dim < 1:
            raise ValueError(f"{name}.dim must be a positive int, got {self.dim!r}")
        r = self.cutoff_ratio
        if not isinstance(r, numbers.Real) or isinstance(r, bool) or not 0.0 < r <= 1.0:
            raise ValueError(f"{name}.cutoff_ratio must be a number in (0, 1], got {r!r}")
        e = self.experts
        if isinstance(e, str) or not isinstance(e, (list, tuple)) or not all(isinstance(x, str) for x in e):
            raise TypeError(f"{name}.experts must be a list of strings from {list(EXPERTS)}, got {e!r}")
        bad = [x for x in e if x not in EXPERTS]
        if not e or bad or len(set(e)) != len(e):
            raise ValueError(f"{name}.experts must be a non-empty list of distinct names from {list(EXPERTS)}, got "
                             f"{e!r}")
        fl = self.frequency_layers
        if fl is not None:
            if isinstance(fl, (str, int)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in fl):
                raise TypeError(f"{name}.frequency_layers must be None or a list of ints, got {fl!r}")
            if "spatial" not in e or not {"low", "high"} & set(e):
                raise ValueError(f"{name}.frequency_layers needs the 'spatial' expert (for the other blocks) and a "
                                 f"'low' or 'high' expert (for these), got experts={e!r}")
        s = self.scale
        if not isinstance(s, numbers.Real) or isinstance(s, bool) or not math.isfinite(s):
            raise ValueError(f"{name}.scale must be a finite number, got {s!r}")
        if not isinstance(self.zero_init, bool):
            raise TypeError(f"{name}.zero_init must be a bool, got {self.zero_init!r}")
        if self.targets not in (None, ["block"]):
            raise ValueError(f"{name}.targets must be None or ['block'] (the adapter acts on block outputs), got "
                             f"{self.targets!r}")


# --- the frequency split ----------------------------------------------------------------------------------------------


def cutoff_bins(n: int, ratio: float) -> int:
    """Largest frequency index ``floor(ratio * n / 2)`` kept in the low band of an axis of length ``n``."""
    return math.floor(ratio * n / 2 + 1e-9)  # the epsilon keeps e.g. 0.6 * 10 / 2 = 2.9999... at 3


def low_pass_mask(h: int, w: int, ratio: float, device=None) -> torch.Tensor:
    """Boolean ``(h, w // 2 + 1)`` mask over the ``rfft2`` spectrum of an ``h x w`` grid: True in the low band."""
    kh = torch.arange(h, device=device)
    kh = torch.minimum(kh, h - kh)  # |signed frequency| of each full-FFT row (row h/2 is the Nyquist row)
    kw = torch.arange(w // 2 + 1, device=device)
    return (kh <= cutoff_bins(h, ratio))[:, None] & (kw <= cutoff_bins(w, ratio))[None, :]


def frequency_split(x: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split grid features ``x`` of shape ``(..., H, W, C)`` into low- and high-frequency parts (``low + high = x``).

    The DFT runs over the ``H`` and ``W`` axes, per channel, as a real FFT. Half-precision inputs are transformed in
    float32 (``torch.fft`` has no bfloat16 and no float16 on CPU) and the parts come back in the input's dtype.
    """
    h, w = x.shape[-3], x.shape[-2]
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    spec = torch.fft.rfft2(xf, dim=(-3, -2))
    mask = low_pass_mask(h, w, ratio, x.device).unsqueeze(-1)
    low = torch.fft.irfft2(spec * mask, s=(h, w), dim=(-3, -2)).to(x.dtype)
    return low, x - low


# --- the adapter ------------------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """``up(ReLU(down(z)))``: one expert adapter."""

    def __init__(self, width: int, dim: int, zero_up: bool, **kw) -> None:
        super().__init__()
        self.down = nn.Linear(width, dim, **kw)
        self.up = nn.Linear(dim, width, **kw)
        if zero_up:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.up(F.relu(self.down(z)))


class FrequencyMixtureAdapter(Adapter):
    """Adds ``s * sum_e w_e A_e(T_e)`` to the patch tokens of a block's output (see the module docstring)."""

    def __init__(self, site, width: int, dim: int, experts: list[str], cutoff_ratio: float, scale: float,
                 num_prefix: int, grid: Optional[tuple[int, int]], seq_first: bool, zero_init: bool,
                 device=None, dtype=None) -> None:
        super().__init__(site)
        kw = dict(device=device, dtype=dtype)
        self.expert_names = list(experts)
        self.cutoff_ratio = float(cutoff_ratio)
        self.num_prefix = num_prefix
        self.grid = grid
        self.seq_first = seq_first
        self.experts = nn.ModuleDict({e: Bottleneck(width, dim, zero_init, **kw) for e in self.expert_names})
        self.router = nn.Linear(width, len(self.expert_names), **kw) if len(self.expert_names) > 1 else None
        self.scale = nn.Parameter(torch.full((1,), float(scale), **kw))

    def extra_repr(self) -> str:
        return (f"site={self.site.qualified!r}, experts={self.expert_names}, cutoff_ratio={self.cutoff_ratio}, "
                f"num_prefix={self.num_prefix}")

    def grid_of(self, n: int) -> tuple[int, int]:
        """The ``(H, W)`` patch grid of ``n`` patch tokens: the tower's grid if it fits, else the square one."""
        if self.grid is not None and self.grid[0] * self.grid[1] == n:
            return self.grid
        s = math.isqrt(n)
        if n > 0 and s * s == n:
            return s, s
        raise ValueError(f"Earth-Adapter at {self.site.qualified!r} ({self.site.path!r}): {n} patch tokens (after "
                         f"{self.num_prefix} prefix tokens) form neither the tower's {self.grid} grid nor a square "
                         "grid; the 2-D DFT needs the patch grid (patch dropout and non-square dynamic sizes are not "
                         "supported)")

    def delta(self, tokens: torch.Tensor) -> torch.Tensor:
        """The mixture ``sum_e w_e A_e(T_e)`` for patch tokens ``(B, H*W, C)`` (before the scale)."""
        inputs = {"spatial": tokens}
        if "low" in self.experts or "high" in self.experts:
            h, w = self.grid_of(tokens.shape[1])
            low, high = frequency_split(tokens.unflatten(1, (h, w)), self.cutoff_ratio)
            inputs["low"], inputs["high"] = low.flatten(1, 2), high.flatten(1, 2)
        outs = [self.experts[e](inputs[e]) for e in self.expert_names]
        if self.router is None:
            return outs[0]
        weights = self.router(tokens).softmax(dim=-1)
        out = weights[..., :1] * outs[0]
        for i in range(1, len(outs)):
            out = out + weights[..., i:i + 1] * outs[i]
        return out

    def post(self, y: torch.Tensor, ctx) -> torch.Tensor:  # noqa: D102
        if self.seq_first:  # (L, N, C) blocks of older open_clip
            y = y.transpose(0, 1)
        n = self.num_prefix
        tokens = y[:, n:]
        out = torch.cat([y[:, :n], tokens + self.scale.to(y.dtype) * self.delta(tokens).to(y.dtype)], dim=1)
        return out.transpose(0, 1) if self.seq_first else out


def tower_grid(model: nn.Module, spec, site) -> Optional[tuple[int, int]]:
    """The patch grid the tower was built for: ``grid_size`` of the module holding the patch projection (timm's
    ``patch_embed``, open_clip's ``VisionTransformer``), or ``None`` when it has none."""
    path = spec.towers[site.tower].global_sites.get("embed")
    if not path:
        return None
    from .layers import unwrap

    parent = path.rpartition(".")[0]
    grid = getattr(unwrap(model.get_submodule(parent)) if parent else unwrap(model), "grid_size", None)
    if isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(g, int) and g > 0 for g in grid):
        return int(grid[0]), int(grid[1])
    return None


@register_method
class EarthAdapter(Method):
    """Earth-Adapter: mixture of spatial, low- and high-frequency adapters on block outputs."""

    name = "earth_adapter"
    config_class = EarthAdapterConfig
    site_kinds = ("block",)
    default_targets = ("block",)

    def check_site(self, model, spec, site):  # noqa: D102
        super().check_site(model, spec, site)
        tower = spec.towers[site.tower]
        if tower.causal:
            raise ValueError(
                f"Earth-Adapter splits patch tokens by a 2-D DFT over the image grid; site {site.qualified!r} at "
                f"{site.path!r} is on a causal text tower (a 1-D sequence without a grid, where a low-pass would mix "
                "later tokens into earlier ones). Attach it to the image tower (e.g. towers=['visual'])")
        if tower.layout not in ("NLC", "LNC"):
            raise ValueError(f"Earth-Adapter needs blocks with token layout NLC or LNC; site {site.qualified!r} at "
                             f"{site.path!r} has layout {tower.layout!r}")
        if tower_grid(model, spec, site) is None:
            raise ValueError(
                f"Earth-Adapter splits patch tokens by a 2-D DFT over the image grid; site {site.qualified!r} at "
                f"{site.path!r} is on a tower without a patch grid (no grid_size next to its patch embedding: its "
                "tokens are not image patches, e.g. point-cloud groups)")

    def resolve(self, model, spec):  # noqa: D102
        sites = super().resolve(model, spec)
        fl = self.config.frequency_layers
        self._frequency: dict[str, set[int]] = {}
        for tname in dict.fromkeys(s.tower for s in sites):
            adapted = {s.layer for s in sites if s.tower == tname}
            if fl is None:
                self._frequency[tname] = adapted
                continue
            depth = spec.towers[tname].depth
            chosen = set()
            for i in fl:
                j = i + depth if i < 0 else i
                if not 0 <= j < depth:
                    raise ValueError(f"EarthAdapterConfig.frequency_layers: index {i} is out of range for tower "
                                     f"{tname or '(main)'!r} with {depth} blocks (valid: 0..{depth - 1} or "
                                     f"-{depth}..-1)")
                if j not in adapted:
                    raise ValueError(f"EarthAdapterConfig.frequency_layers: block {i} of tower {tname or '(main)'!r} "
                                     f"gets no adapter; adapted blocks (from layers): {sorted(adapted)}")
                chosen.add(j)
            self._frequency[tname] = chosen
        return sites

    def make_adapter(self, model, spec, sites, module, shared):  # noqa: D102
        cfg = self.config
        site = sites[0]
        tower = spec.towers[site.tower]
        experts = cfg.experts if site.layer in self._frequency[site.tower] else ["spatial"]
        p = next(module.parameters())
        return FrequencyMixtureAdapter(site, tower.width, cfg.dim, experts, cfg.cutoff_ratio, cfg.scale,
                                       tower.num_prefix_tokens, tower_grid(model, spec, site), tower.layout == "LNC",
                                       cfg.zero_init, device=p.device, dtype=p.dtype)
