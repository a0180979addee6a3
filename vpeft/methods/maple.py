"""MaPLe: Multi-modal Prompt Learning (Khattak et al., CVPR 2023, arXiv:2210.03117).

Deep text prompts as in IVLP, but the vision prompts are *coupled*: at every prompted depth ``i`` the vision prompt
is a linear projection of that depth's text prompt, ``P_v(i) = F_i(P_t(i))`` (``F_0`` projects the embedding-level
context). Only the text prompts and the coupling functions learn.

Paper defaults: 2 prompt tokens, depth ``J = 9`` on both towers, ``ctx_init="a photo of a"`` (its first 2 tokens
learn, "of a" stays text), deeper text prompts ``N(0, 0.02^2)``, coupling functions ``nn.Linear(d_text, d_vision)``
with PyTorch's default initialisation. Recipe (task level): SGD lr 0.0035, batch 4, 5 epochs (base-to-new).

Trainable parameters (``n`` tokens, depth ``J``): ``J * n * d_text + J * (d_text * d_vision + d_vision)``; CLIP
ViT-B/16 (512 / 768, n = 2, J = 9): 9,216 + 3,545,856 = 3,555,072 (the paper's 3.55M).

Deviations from the reference implementation (muzairkhattak/multimodal-prompt-learning):
    * Vision prompts sit right after the class token instead of at the end of the sequence (see IVLP).
    * Prompts are inserted/replaced by block wrappers around open_clip's own blocks instead of re-written blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ._text_prompts import PromptLearner, check_positive_int, normal_
from .base import PeftConfig, register_method
from .coop import build_context, validate_context
from .ivlp import DeepPromptMethod


@dataclass
class MaPLeConfig(PeftConfig):
    """MaPLe configuration.

    Attributes:
        n_ctx: Prompt tokens (text and vision).
        depth: Prompted depth ``J`` on both towers.
        ctx_init: Initialisation words of the embedding-level text context (``None``: random).
        init_std: Standard deviation of the random text prompt initialisation.
    """

    n_ctx: Optional[int] = 2
    depth: int = 9
    ctx_init: Optional[str] = "a photo of a"
    init_std: float = 0.02

    def validate(self) -> None:  # noqa: D102
        super().validate()
        validate_context(self)
        check_positive_int(self, "n_ctx")
        check_positive_int(self, "depth")


class MaPLeLearner(PromptLearner):
    """Text prompts ``ctx`` and ``compound_prompts_text[i-1]``; coupling functions ``proj`` (depth 0) and
    ``compound_prompt_projections[i-1]`` map them to the vision prompts."""

    def __init__(self, ctx: torch.Tensor, placeholder: int, fixed_words: str, depth: int, d_vision: int,
                 std: float) -> None:
        super().__init__(ctx.shape[0], placeholder, "end", fixed_words, depth, depth, ctx.shape[0])
        d = ctx.shape[1]
        self.ctx = nn.Parameter(ctx)
        self.proj = nn.Linear(d, d_vision).to(device=ctx.device, dtype=ctx.dtype)
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(normal_(ctx.shape, ctx, std)) for _ in range(depth - 1)])
        self.compound_prompt_projections = nn.ModuleList(
            [nn.Linear(d, d_vision).to(device=ctx.device, dtype=ctx.dtype) for _ in range(depth - 1)])

    def text_prompt(self, layer: int) -> torch.Tensor:  # noqa: D102
        return self.compound_prompts_text[layer - 1]

    def vision_prompt(self, layer: int) -> torch.Tensor:  # noqa: D102
        if layer == 0:
            return self.proj(self.ctx)
        return self.compound_prompt_projections[layer - 1](self.compound_prompts_text[layer - 1])


@register_method
class MaPLe(DeepPromptMethod):
    """Multi-modal Prompt Learning: text prompts coupled to vision prompts."""

    name = "maple"
    config_class = MaPLeConfig

    def text_depth(self) -> int:  # noqa: D102
        return self.config.depth

    def vision_depth(self) -> int:  # noqa: D102
        return self.config.depth

    def build_shared(self, model, spec, sites):  # noqa: D102
        cfg = self.config
        ctx, fixed, placeholder = build_context(self, model, spec, cfg.n_ctx)
        return MaPLeLearner(ctx, placeholder, fixed, cfg.depth, self.vision_width(spec), cfg.init_std)
