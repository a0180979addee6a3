"""AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition (Chen, Ge, Tong, Wang, Song, Wang and
Luo, NeurIPS 2022, arXiv:2205.13535).

AdaptMLP puts a trainable bottleneck beside each frozen MLP. With ``x'`` the residual stream after attention, the
block computes ``x = x' + MLP(LN(x')) + s * (ReLU(LN(x') W_down + b_down) W_up + b_up)``: the branch reads the same
normalised input as the MLP and its output is added to the MLP output. In vpeft it attaches to the ``mlp`` site
(timm ``blocks.i.mlp``, open_clip ``resblocks.i.mlp`` in either tower): the wrapper hands the adapter the MLP input
``x = LN(x')`` and the MLP output ``y`` and takes ``y + s * up(dropout(ReLU(down(x))))``.

Paper defaults: bottleneck (middle) dimension ``d_hat = 64``, scale ``s = 0.1``, every block. The down-projection is
randomly initialised like LoRA's A (Kaiming-uniform, a = sqrt(5): the official ``init_option="lora"``), the
up-projection and both biases are zero, so training starts from the pretrained function. The branch is nonlinear in
its input, so it cannot be folded into the MLP weights: :meth:`PeftModel.merge` refuses it.

Trainable parameters per adapted block of width ``d``: ``d * d_hat + d_hat`` (down) ``+ d_hat * d + d`` (up).
ViT-B/16 (12 blocks, d = 768, d_hat = 64): ``12 * (2 * 768 * 64 + 64 + 768) = 1,189,632``.

:class:`BottleneckAdapter` is the reusable part (down -> activation -> dropout -> up, times ``scale``); MoSA
(:mod:`vpeft.methods.mosa`) builds on it.

Deviations from the reference implementation (ShoufaChen/AdaptFormer):
    * The official scripts feed the branch the un-normalised residual stream ``x'``
      (``ffn_adapter_layernorm_option="none"``); here it reads ``LN(x')``, the MLP input, as in the paper's equation.
    * The branch output joins the MLP output inside the block, so a block's LayerScale / drop-path (none in ViT-B/16)
      applies to it as well; the official code adds it after the MLP's drop-path.
    * Dropout 0.1 on the bottleneck activations follows the official code (the paper does not state a value).
    * The official code's ``learnable_scalar`` option is not offered: the paper uses a fixed ``s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Adapter, Method, PeftConfig, register_method

#: Activations accepted between the projections.
ACTIVATIONS = ("relu", "gelu")


@dataclass
class AdaptFormerConfig(PeftConfig):
    """AdaptFormer configuration.

    Attributes:
        bottleneck: Middle dimension ``d_hat`` of the down -> up branch (paper: 64).
        scale: Fixed factor ``s`` on the branch output (paper: 0.1).
        dropout: Dropout on the bottleneck activations (official code: 0.1).
        activation: ``"relu"`` (paper) or ``"gelu"``.
        targets: Sites (default ``["mlp"]``, the whole MLP of every block; ``"text.mlp"`` reaches a CLIP text tower).
    """

    bottleneck: int = 64
    scale: float = 0.1
    dropout: float = 0.1
    activation: str = "relu"

    def validate(self) -> None:  # noqa: D102
        super().validate()
        name = type(self).__name__
        if not isinstance(self.bottleneck, int) or isinstance(self.bottleneck, bool) or self.bottleneck < 1:
            raise ValueError(f"{name}.bottleneck must be a positive int, got {self.bottleneck!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise TypeError(f"{name}.scale must be a number, got {self.scale!r}")
        if not math.isfinite(self.scale):
            raise ValueError(f"{name}.scale must be finite, got {self.scale!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or \
                not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{name}.dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{name}.activation must be one of {list(ACTIVATIONS)}, got {self.activation!r}")


class BottleneckAdapter(Adapter):
    """A parallel bottleneck: ``forward(x, y) = y + branch(x)`` with
    ``branch(x) = scale * up(dropout(act(down(x))))``.

    ``down`` is an ``nn.Linear(in_features, bottleneck)`` and ``up`` an ``nn.Linear(bottleneck, out_features)``, so
    the canonical keys are ``<site>.<method>.down.weight`` etc. Subclasses change which weights the branch uses by
    overriding :meth:`projections` (MoSA masks them).

    Args:
        site: The site this adapter serves.
        in_features: Width of the site input.
        out_features: Width of the site output.
        bottleneck: Middle dimension.
        scale: Factor on the branch output.
        dropout: Dropout probability on the bottleneck activations.
        activation: ``"relu"`` or ``"gelu"``.
        like: A tensor whose device and dtype the parameters take (the site's weight).
    """

    mergeable = False

    def __init__(self, site, in_features: int, out_features: int, bottleneck: int, scale: float, dropout: float,
                 activation: str, like: torch.Tensor) -> None:
        super().__init__(site)
        kw = dict(device=like.device, dtype=like.dtype)
        self.down = nn.Linear(in_features, bottleneck, **kw)
        self.up = nn.Linear(bottleneck, out_features, **kw)
        self.act = nn.ReLU() if activation == "relu" else nn.GELU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = float(scale)
        self.activation = activation
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Paper initialisation: LoRA-A-style Kaiming-uniform down-projection; zero up-projection and biases."""
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def projections(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(down.weight, down.bias, up.weight, up.bias)`` as used by this forward."""
        return self.down.weight, self.down.bias, self.up.weight, self.up.bias

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """``scale * up(dropout(act(down(x))))`` with the weights of :meth:`projections`."""
        return self.bottleneck_branch(x, *self.projections())

    def bottleneck_branch(self, x: torch.Tensor, wd: torch.Tensor, bd: Optional[torch.Tensor], wu: torch.Tensor,
                          bu: Optional[torch.Tensor]) -> torch.Tensor:
        """``scale * (dropout(act(x wd^T + bd)) wu^T + bu)`` for the given weights."""
        h = self.dropout(self.act(F.linear(x, wd, bd)))
        return F.linear(h, wu, bu) * self.scale

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return y + self.branch(x)

    def extra_repr(self) -> str:
        return f"site={self.site.qualified!r}, scale={self.scale:g}, activation={self.activation!r}"


def _linears(module: nn.Module) -> list[nn.Linear]:
    """The Linear layers of ``module`` in definition order, looking through wrappers but not into adapters."""
    if isinstance(module, Adapter):
        return []
    if isinstance(module, nn.Linear):
        return [module]
    out: list[nn.Linear] = []
    for child in module.children():
        out += _linears(child)
    return out


def mlp_features(site, module: nn.Module) -> tuple[int, int, torch.Tensor]:
    """``(in_features, out_features, weight)`` of the MLP at ``site``: the first Linear's input width, the last
    Linear's output width and the first Linear's weight (for device and dtype).

    Raises:
        ValueError: the module holds no Linear layer.
    """
    lin = _linears(module)
    if not lin:
        raise ValueError(f"site {site.qualified!r} at {site.path!r} ({type(module).__name__}) holds no Linear layer; "
                         "a parallel bottleneck adapter needs an MLP with Linear projections")
    return lin[0].in_features, lin[-1].out_features, lin[0].weight


@register_method
class AdaptFormer(Method):
    """AdaptFormer: a scaled parallel bottleneck beside every MLP."""

    name = "adaptformer"
    config_class = AdaptFormerConfig
    site_kinds = ("other",)
    default_targets = ("mlp",)
    mergeable = False

    def check_site(self, model, spec, site) -> None:  # noqa: D102
        if site.name != "mlp":
            raise ValueError(f"method {self.name!r} runs beside a whole MLP: site {site.qualified!r} at {site.path!r} "
                             "is not one; use targets ['mlp'] (or 'text.mlp' / 'visual.mlp')")
        super().check_site(model, spec, site)
        mlp_features(site, model.get_submodule(site.path))

    def make_adapter(self, model, spec, sites, module, shared) -> Adapter:  # noqa: D102
        c = self.config
        in_f, out_f, like = mlp_features(sites[0], module)
        return BottleneckAdapter(sites[0], in_f, out_f, c.bottleneck, c.scale, c.dropout, c.activation, like)

