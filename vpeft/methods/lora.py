"""LoRA: Low-Rank Adaptation (Hu et al., 2021, arXiv:2106.09685).

``W x + (alpha / r) * B A x`` with ``A`` (r x in) random and ``B`` (out x r) zero, so training starts from the
pretrained function. On timm's fused ``qkv`` Linear and open_clip's packed ``in_proj_weight`` the q, k and v targets
are slices of one projection: each targeted slice gets its own A/B pair, and the down-projections of all slices
run as one matmul over the input.

Paper defaults: targets W_q and W_v, r=8 (the rank used in most of the paper's ablations), alpha = r (the paper
sets alpha to the first r tried and does not tune it, i.e. scaling 1), no dropout.

Trainable parameters: for each adapted slice ``r * (in + out_slice)``; LoRA r=8 on q and v of ViT-B/16:
``12 * 2 * 8 * (768 + 768) = 294,912``.

Deviations from the reference implementation (microsoft/LoRA ``loralib``):
    * ``A`` uses loralib's Kaiming-uniform init (a=sqrt(5)); the paper text says "random Gaussian". Set
      ``init_a="gaussian"`` for N(0, 1/r).
    * Merging is explicit (``PeftModel.merge``) rather than tied to ``train()/eval()`` as in loralib.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ._lowrank import LowRankConfig, SliceDeltaAdapter, WeightDeltaMethod, site_weight
from .base import register_method


@dataclass
class LoraConfig(LowRankConfig):
    """LoRA configuration.

    Attributes:
        r: Rank of the update.
        alpha: Scale numerator; the update is multiplied by ``alpha / r``. ``None`` means ``alpha = r``.
        dropout: Dropout on the LoRA branch input.
        init_a: ``"kaiming"`` (loralib) or ``"gaussian"`` (N(0, 1/r)) initialisation of ``A``.
        targets: Sites among ``q, k, v, qkv, attn_out, mlp_in, mlp_out`` (default ``["q", "v"]``).
    """


def init_lora_a(a: torch.Tensor, how: str, r: int) -> None:
    """Initialise a down-projection in place (loralib's Kaiming-uniform, or N(0, 1/r))."""
    if how == "kaiming":
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    else:
        nn.init.normal_(a, std=1.0 / r)


class LoraAdapter(SliceDeltaAdapter):
    """One A/B pair per output slice: ``lora_A.<slice>`` (r, in), ``lora_B.<slice>`` (out_slice, r)."""

    def __init__(self, site, slices, in_features: int, cfg: LoraConfig, like: torch.Tensor) -> None:
        super().__init__(site, slices, cfg.scaling, cfg.dropout)
        kw = dict(device=like.device, dtype=like.dtype)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (a, b) in slices.items():
            A = torch.empty(cfg.r, in_features, **kw)
            init_lora_a(A, cfg.init_a, cfg.r)
            self.lora_A[name] = nn.Parameter(A)
            self.lora_B[name] = nn.Parameter(torch.zeros(b - a, cfg.r, **kw))

    def factors(self):  # noqa: D102
        return {n: (self.lora_A[n], self.lora_B[n]) for n in self.slices}


@register_method
class Lora(WeightDeltaMethod):
    """LoRA on Linear sites and q/k/v slices of fused or packed projections."""

    name = "lora"
    config_class = LoraConfig

    def make_adapter(self, model, spec, sites, module, shared):  # noqa: D102
        slices, in_f = self.check_rank(sites, module, self.config.r)
        return LoraAdapter(sites[0], slices, in_f, self.config, site_weight(module)[0])
