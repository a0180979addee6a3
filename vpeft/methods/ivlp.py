"""IVLP: Independent Vision-Language Prompting (deep text and vision prompts learned independently), the baseline of
MaPLe (Khattak et al., CVPR 2023, arXiv:2210.03117, section 4 / Table 6) and the architecture PromptSRC trains.

Text side: ``n_ctx`` context tokens at the embedding (initialised from the first ``n_ctx`` tokens of ``ctx_init``;
the remaining words stay fixed text) and new prompts replacing those positions at text blocks ``1..text_depth-1``.
Image side: ``n_ctx_vision`` prompt tokens inserted before block 0 (through the tower's ``ln_pre``) and replaced
by fresh prompts at blocks ``1..vision_depth-1``; deeper blocks process the prompt outputs they receive, and every
block removes them from its output so the image tower's layout is unchanged outside blocks.

Paper defaults (MaPLe's IVLP baseline): 2 text + 2 vision tokens, depth 9 on both towers, ``ctx_init="a photo of
a"``, prompts ``N(0, 0.02^2)``. Recipe (task level): SGD lr 0.0035, batch 4, 5 epochs (base-to-new).

Trainable parameters: ``text_depth * n_ctx * d_text + vision_depth * n_ctx_vision * d_vision``; CLIP ViT-B/16
(512 / 768): 9 * 2 * 512 + 9 * 2 * 768 = 23,040.

Deviations from the reference implementation (muzairkhattak/multimodal-prompt-learning):
    * Vision prompts sit right after the class token instead of at the end of the sequence. Attention in the image
      tower has no mask and no position-dependent term after the embedding, so outputs are the same up to float
      summation order.
    * Prompts are inserted/replaced by block wrappers around open_clip's own blocks instead of re-written blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ._text_prompts import PromptLearner, TextPromptMethod, check_positive_int, normal_
from .base import PeftConfig, register_method
from .coop import build_context, validate_context


@dataclass
class IVLPConfig(PeftConfig):
    """IVLP configuration.

    Attributes:
        n_ctx: Text context tokens (first ``n_ctx`` tokens of ``ctx_init`` when given).
        n_ctx_vision: Vision prompt tokens.
        text_depth: Text blocks with learned prompts (1 = the embedding only).
        vision_depth: Image blocks with fresh learned prompts (0 = no vision prompts).
        ctx_init: Initialisation words of the text context (``None``: random).
        init_std: Standard deviation of random prompt initialisation.
    """

    n_ctx: Optional[int] = 2
    n_ctx_vision: int = 2
    text_depth: int = 9
    vision_depth: int = 9
    ctx_init: Optional[str] = "a photo of a"
    init_std: float = 0.02

    def validate(self) -> None:  # noqa: D102
        super().validate()
        validate_context(self)
        check_positive_int(self, "n_ctx")
        check_positive_int(self, "text_depth")
        check_positive_int(self, "vision_depth", minimum=0)
        check_positive_int(self, "n_ctx_vision")


class DeepPromptLearner(PromptLearner):
    """Independent deep prompts: ``ctx`` (text, block 0), ``text_prompts[i-1]`` for text block ``i``,
    ``vision_prompts[i]`` for image block ``i``."""

    def __init__(self, ctx: torch.Tensor, placeholder: int, fixed_words: str, text_depth: int, vision_depth: int,
                 n_ctx_vision: int, d_vision: int, std: float) -> None:
        super().__init__(ctx.shape[0], placeholder, "end", fixed_words, text_depth, vision_depth, n_ctx_vision)
        self.ctx = nn.Parameter(ctx)
        self.text_prompts = nn.ParameterList(
            [nn.Parameter(normal_(ctx.shape, ctx, std)) for _ in range(text_depth - 1)])
        self.vision_prompts = nn.ParameterList(
            [nn.Parameter(normal_((n_ctx_vision, d_vision), ctx, std)) for _ in range(vision_depth)])

    def text_prompt(self, layer: int) -> torch.Tensor:  # noqa: D102
        return self.text_prompts[layer - 1]

    def vision_prompt(self, layer: int) -> torch.Tensor:  # noqa: D102
        return self.vision_prompts[layer]


class DeepPromptMethod(TextPromptMethod):
    """Base of IVLP-style methods (text and vision prompts to a depth)."""

    init_prefix_only = True

    @property
    def uses_vision(self) -> bool:  # noqa: D102
        return self.vision_depth() > 0

    def text_depth(self) -> int:  # noqa: D102
        return self.config.text_depth

    def vision_depth(self) -> int:  # noqa: D102
        return self.config.vision_depth

    def vision_width(self, spec) -> int:
        """Token width of the image tower."""
        return spec.towers["visual"].width if "visual" in spec.towers else 0


@register_method
class IVLP(DeepPromptMethod):
    """Independent Vision-Language Prompting (deep text and vision prompts)."""

    name = "ivlp"
    config_class = IVLPConfig

    def build_shared(self, model, spec, sites):  # noqa: D102
        cfg = self.config
        ctx, fixed, placeholder = build_context(self, model, spec, cfg.n_ctx)
        return DeepPromptLearner(ctx, placeholder, fixed, cfg.text_depth, cfg.vision_depth, cfg.n_ctx_vision,
                                 self.vision_width(spec), cfg.init_std)
