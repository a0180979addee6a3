"""CoOp: Context Optimization (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022,
arXiv:2109.01134).

The hand-written context of a CLIP prompt ("a photo of a {class}.") is replaced by ``n_ctx`` learned word
embeddings, shared by all classes (unified context) or one set per class (class-specific context, ``csc``); the class
name goes at the end, in the middle or at the front. Only the context trains; both CLIP towers stay frozen.

Paper defaults: ``n_ctx=16`` randomly initialised from ``N(0, 0.02^2)``, unified context, class token at the end;
``ctx_init="a photo of a"`` (4 tokens) initialises from those words' embeddings instead. Training recipe (task
level): SGD lr 0.002, cosine, batch 32, 200 epochs at 16 shots (50 at 1-2 shots on ImageNet ...).

Trainable parameters: ``n_ctx * d_text`` (unified) or ``num_classes * n_ctx * d_text`` (csc). CLIP ViT-B/16
(``d_text = 512``): 16 tokens 8,192; ``"a photo of a"`` 2,048.

Deviations from the reference implementation (KaiyangZhou/CoOp):
    * Context positions are marked in the token ids (placeholder = start-of-text id) and filled in by an adapter
      on open_clip's own token embedding, instead of a re-written text encoder fed with pre-computed prefix/suffix
      embeddings; the frozen CLIP ``encode_text`` runs unchanged.
    * With ``ctx_init``, ``n_ctx`` is the init's number of BPE tokens (CoOp counts words, which differs only for
      words that split into several tokens).
    * Class-specific context needs ``num_classes`` at construction (CoOp reads it from the dataset).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from ._text_prompts import POSITIONS, PromptLearner, TextPromptMethod, check_positive_int, init_context, normal_
from .base import PeftConfig, register_method

DEFAULT_N_CTX = 16


@dataclass
class CoOpConfig(PeftConfig):
    """CoOp configuration.

    Attributes:
        n_ctx: Learned context tokens (default 16; with ``ctx_init``, the number of its tokens).
        ctx_init: Words whose embeddings initialise the context (e.g. ``"a photo of a"``); ``None``: random.
        csc: Class-specific context (one context per class) instead of one shared by all classes.
        num_classes: Number of classes; required with ``csc``.
        class_token_position: ``"end"``, ``"middle"`` or ``"front"``.
        init_std: Standard deviation of the random context initialisation.
    """

    n_ctx: Optional[int] = None
    ctx_init: Optional[str] = None
    csc: bool = False
    num_classes: Optional[int] = None
    class_token_position: str = "end"
    init_std: float = 0.02

    def validate(self) -> None:  # noqa: D102
        super().validate()
        validate_context(self)
        if self.csc:
            check_positive_int(self, "num_classes")
        elif self.num_classes is not None:
            raise ValueError("CoOpConfig.num_classes is only used with csc=True (class-specific context)")


def validate_context(cfg) -> None:
    """Checks shared by the CoOp-style configs (n_ctx, ctx_init, class_token_position, init_std)."""
    name = type(cfg).__name__
    check_positive_int(cfg, "n_ctx", allow_none=True)
    if cfg.ctx_init is not None and (not isinstance(cfg.ctx_init, str) or not cfg.ctx_init.strip()):
        raise ValueError(f"{name}.ctx_init must be a non-empty string or None, got {cfg.ctx_init!r}")
    if getattr(cfg, "class_token_position", "end") not in POSITIONS:
        raise ValueError(f"{name}.class_token_position must be one of {POSITIONS}, got {cfg.class_token_position!r}")
    if not isinstance(cfg.init_std, (int, float)) or cfg.init_std <= 0:
        raise ValueError(f"{name}.init_std must be a positive number, got {cfg.init_std!r}")


def build_context(method: TextPromptMethod, model: nn.Module, spec, default_n_ctx: int):
    """Initial context ``(n_ctx, d)`` (from ``ctx_init`` or random), the fixed words, and the placeholder id."""
    cfg = method.config
    embed = method.token_embedding(model, spec)
    name = type(cfg).__name__
    if cfg.ctx_init is not None:
        # CoOp learns all tokens of ctx_init; MaPLe/IVLP/PromptSRC (init_prefix_only) learn the first n_ctx and keep
        # the remaining words as fixed text.
        ctx, fixed = init_context(model, embed, cfg.ctx_init, cfg.n_ctx, name)
        if not getattr(method, "init_prefix_only", False) and fixed:
            raise ValueError(f"{name}: n_ctx={cfg.n_ctx} is fewer than the tokens of ctx_init {cfg.ctx_init!r}; "
                             "leave n_ctx unset to learn all of them")
    else:
        n = cfg.n_ctx if cfg.n_ctx is not None else default_n_ctx
        ctx, fixed = normal_((n, embed.weight.shape[1]), embed.weight, cfg.init_std), ""
    # CLIP's vocabulary ends with start- and end-of-text; the start id marks context positions (see _text_prompts).
    placeholder = embed.weight.shape[0] - 2
    return ctx, fixed, placeholder


class CoOpLearner(PromptLearner):
    """CoOp's learnable context: ``ctx`` of shape ``(n_ctx, d)`` or ``(num_classes, n_ctx, d)``."""

    def __init__(self, ctx, placeholder: int, position: str, fixed_words: str = "") -> None:
        super().__init__(ctx.shape[-2], placeholder, position, fixed_words)
        self.ctx = nn.Parameter(ctx)


@register_method
class CoOp(TextPromptMethod):
    """Context Optimization: learned text context for CLIP."""

    name = "coop"
    config_class = CoOpConfig

    def build_shared(self, model, spec, sites):  # noqa: D102
        cfg = self.config
        ctx, fixed, placeholder = build_context(self, model, spec, DEFAULT_N_CTX)
        if cfg.csc:
            ctx = ctx.unsqueeze(0).repeat(cfg.num_classes, 1, 1)
            if cfg.ctx_init is None:  # CoOp draws every class's random context independently
                ctx.normal_(0.0, cfg.init_std)
        return CoOpLearner(ctx, placeholder, cfg.class_token_position, fixed)
