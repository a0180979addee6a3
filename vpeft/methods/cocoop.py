"""CoCoOp: Conditional Context Optimization (Zhou et al., "Conditional Prompt Learning for Vision-Language Models",
CVPR 2022, arXiv:2203.05557).

CoOp's context plus a small meta-network that turns each image's feature into a token ``pi(x)`` added to every
context token: ``ctx_m(x) = ctx_m + pi(x)``. Prompts are therefore per image; the text encoder runs on
``batch * classes`` rows. vpeft batches all of them in one call (rows image-major: ``b * num_classes + c``), reading
the normalised image features from ``PeftModel.conditioning(image_features=...)``; ``ClipClassifier`` does this and
chunks the rows over classes to bound memory.

Paper defaults: ``n_ctx=4`` initialised from ``"a photo of a"``; meta-net Linear(D, D/16)-ReLU-Linear(D/16, d)
where ``D`` is the image feature dimension and ``d`` the text width. Recipe (task level): SGD lr 0.002, batch 1,
10 epochs.

Trainable parameters: ``n_ctx * d + D * D/16 + D/16 + D/16 * d + d``; CLIP ViT-B/16 (D = d = 512):
2,048 + 16,416 + 16,896 = 35,360.

Deviations from the reference implementation (KaiyangZhou/CoOp, ``trainers/cocoop.py``):
    * All images of a batch are encoded in one batched text forward instead of a Python loop over images
      (identical results, and batch sizes above 1 become practical).
    * Context positions are filled in by an adapter on open_clip's own token embedding (see CoOp).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ._text_prompts import IMAGE_FEATURES_KEY, PromptLearner, TextPromptMethod, check_positive_int
from .base import PeftConfig, register_method
from .coop import build_context, validate_context


@dataclass
class CoCoOpConfig(PeftConfig):
    """CoCoOp configuration.

    Attributes:
        n_ctx: Learned context tokens (default: the tokens of ``ctx_init``, else 4).
        ctx_init: Initialisation words (``None``: random).
        reduction: Meta-net bottleneck: hidden width = image feature dim // reduction.
        init_std: Standard deviation of a random context initialisation.
    """

    n_ctx: Optional[int] = None
    ctx_init: Optional[str] = "a photo of a"
    reduction: int = 16
    init_std: float = 0.02

    def validate(self) -> None:  # noqa: D102
        super().validate()
        validate_context(self)
        check_positive_int(self, "reduction")


class CoCoOpLearner(PromptLearner):
    """Context ``(n_ctx, d)`` plus the meta-net that shifts it by a per-image token."""

    def __init__(self, ctx: torch.Tensor, placeholder: int, fixed_words: str, image_dim: int, hidden: int) -> None:
        super().__init__(ctx.shape[0], placeholder, "end", fixed_words)
        d = ctx.shape[1]
        self.ctx = nn.Parameter(ctx)
        self.meta_net = nn.Sequential(OrderedDict(
            linear1=nn.Linear(image_dim, hidden), relu=nn.ReLU(inplace=True), linear2=nn.Linear(hidden, d)))
        self.meta_net.to(device=ctx.device, dtype=ctx.dtype)

    @property
    def conditioned(self) -> bool:  # noqa: D102
        return True

    def context(self, rows: int, ctx) -> torch.Tensor:  # noqa: D102
        feats = ctx.get(IMAGE_FEATURES_KEY)
        if feats is None:
            raise ValueError("CoCoOp prompts depend on the image: encode text inside "
                             "PeftModel.conditioning(image_features=<normalised encode_image output>) with rows in "
                             "image-major order (ClipClassifier does this)")
        if feats.dim() != 2 or rows % feats.shape[0]:
            raise ValueError(f"CoCoOp: {rows} text rows do not split evenly over image features of shape "
                             f"{tuple(feats.shape)}; pass (batch, dim) features and batch * classes text rows")
        shift = self.meta_net(feats.to(self.ctx.dtype))  # (B, d)
        c = self.ctx.unsqueeze(0) + shift.unsqueeze(1)  # (B, n_ctx, d)
        return c.repeat_interleave(rows // feats.shape[0], dim=0)


@register_method
class CoCoOp(TextPromptMethod):
    """Conditional Context Optimization: image-conditioned text context."""

    name = "cocoop"
    config_class = CoCoOpConfig

    def build_shared(self, model, spec, sites):  # noqa: D102
        cfg = self.config
        ctx, fixed, placeholder = build_context(self, model, spec, 4)
        image_dim = self.image_embed_dim(model)
        hidden = image_dim // cfg.reduction
        if hidden < 1:
            raise ValueError(f"CoCoOpConfig.reduction={cfg.reduction} leaves no hidden unit for image features of "
                             f"dimension {image_dim}")
        return CoCoOpLearner(ctx, placeholder, fixed, image_dim, hidden)

