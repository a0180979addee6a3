"""VPT: Visual Prompt Tuning (Jia et al., ECCV 2022, arXiv:2203.12119).

Learnable prompt tokens are inserted after the prefix (class/register) tokens. VPT-deep gives every block its own
prompts, inserted at the block input; the block's outputs at prompt positions are discarded. VPT-shallow inserts
prompts once, before the first block, and carries their outputs from block to block. Either way the extra tokens
exist only inside wrapped blocks: every block returns the backbone's own token layout, so pooling,
``forward_intermediates`` and stacked methods see no difference (invariant 1). Shallow prompts travel between
blocks through the ``ForwardContext``, overwritten per block, so gradient checkpointing stays correct.

Paper defaults: ``num_tokens`` from the paper's search grid {1, 5, 10, 50, 100, 200} (50 here), Xavier-uniform
initialisation with fan-in of a patch (``3 * patch_h * patch_w``) and fan-out ``d``, prompt dropout 0.

Trainable parameters: deep ``depth * num_tokens * d``; shallow ``num_tokens * d``. ViT-B/16 with 50 tokens:
deep 460,800, shallow 38,400.

Deviations from the reference implementation (KMnP/vpt):
    * Prompts are inserted by block wrappers instead of a re-written ViT forward, so VPT composes with any method
      and works on any NLC backbone with a spec (timm ViT, open_clip image tower).
    * Prompts go after *all* prefix tokens (class and register tokens), not after the class token only.
    * Text towers (causal mask of fixed length) and windowed NHWC blocks are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .base import Adapter, Method, PeftConfig, register_method


@dataclass
class VPTConfig(PeftConfig):
    """VPT configuration.

    Attributes:
        num_tokens: Prompt tokens per block (deep) or in total (shallow).
        deep: VPT-deep (prompts at every block of ``layers``) or VPT-shallow (before the first block only).
        dropout: Dropout on the prompt tokens.
        patch_fan_in: Fan-in for the Xavier init; ``None`` derives ``3 * patch_h * patch_w`` from the backbone.
        layers: VPT-deep only: blocks that get prompts (default all).
    """

    num_tokens: int = 50
    deep: bool = True
    dropout: float = 0.0
    patch_fan_in: Optional[int] = None

    def validate(self) -> None:  # noqa: D102
        super().validate()
        if not isinstance(self.num_tokens, int) or isinstance(self.num_tokens, bool) or self.num_tokens < 1:
            raise ValueError(f"VPTConfig.num_tokens must be a positive int, got {self.num_tokens!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.deep and self.layers is not None:
            raise ValueError("VPTConfig.layers applies to VPT-deep only; VPT-shallow prompts enter before block 0")
        if self.targets not in (None, ["block"]):
            raise ValueError(f"VPTConfig.targets must be None or ['block'], got {self.targets!r}")


class PromptAdapter(Adapter):
    """Inserts prompt tokens after the prefix tokens of a block input and removes them from its output."""

    def __init__(self, site, key: str, num_tokens: int, num_prefix: int, prompt: Optional[torch.Tensor],
                 dropout: float, carry: bool) -> None:
        super().__init__(site)
        self.key, self.num_tokens, self.num_prefix, self.carry = key, num_tokens, num_prefix, carry
        self.prompt = nn.Parameter(prompt) if prompt is not None else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def pre(self, x: torch.Tensor, ctx) -> torch.Tensor:  # noqa: D102
        if self.prompt is not None:
            p = self.dropout(self.prompt).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        else:
            p = ctx.get(("vpt", self.key, self.site.layer))
            if p is None:
                raise RuntimeError(f"VPT-shallow: no carried prompts reached block {self.site.layer}; blocks must run "
                                   "in order within one PeftModel forward")
        n = self.num_prefix
        return torch.cat([x[:, :n], p, x[:, n:]], dim=1)

    def post(self, y: torch.Tensor, ctx) -> torch.Tensor:  # noqa: D102
        n, t = self.num_prefix, self.num_tokens
        if self.carry:
            ctx.set(("vpt", self.key, self.site.layer + 1), y[:, n:n + t])
        return torch.cat([y[:, :n], y[:, n + t:]], dim=1)


def patch_fan_in(model: nn.Module, spec, site) -> int:
    """``in_channels * patch_h * patch_w`` of the tower's patch projection (VPT's Xavier fan-in)."""
    path = spec.towers[site.tower].global_sites.get("embed")
    m = model.get_submodule(path) if path else None
    if isinstance(m, nn.Conv2d):
        return m.in_channels * m.kernel_size[0] * m.kernel_size[1]
    return 3 * 16 * 16


@register_method
class VPT(Method):
    """Visual Prompt Tuning (shallow or deep)."""

    name = "vpt"
    config_class = VPTConfig
    site_kinds = ("block",)
    default_targets = ("block",)

    def check_site(self, model, spec, site):  # noqa: D102
        super().check_site(model, spec, site)
        tower = spec.towers[site.tower]
        if tower.causal or tower.layout != "NLC":
            raise ValueError(f"VPT needs image-token blocks in NLC layout; site {site.qualified!r} at {site.path!r} is "
                             f"on a {'causal text' if tower.causal else tower.layout} tower. Use VPT on the image "
                             "tower (e.g. towers=['visual']) or a text-prompt method (CoOp) for text")

    def make_adapter(self, model, spec, sites, module, shared):  # noqa: D102
        cfg = self.config
        site = sites[0]
        tower = spec.towers[site.tower]
        has_params = cfg.deep or site.layer == 0
        prompt = None
        if has_params:
            fan_in = cfg.patch_fan_in or patch_fan_in(model, spec, site)
            val = math.sqrt(6.0 / float(fan_in + tower.width))
            w = next(module.parameters())
            prompt = torch.empty(cfg.num_tokens, tower.width, device=w.device, dtype=w.dtype).uniform_(-val, val)
        carry = (not cfg.deep) and site.layer < tower.depth - 1
        return PromptAdapter(site, self.key, cfg.num_tokens, tower.num_prefix_tokens, prompt, cfg.dropout, carry)
