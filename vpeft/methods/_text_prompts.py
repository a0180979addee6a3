"""Shared machinery of CLIP prompt learning (CoOp, CoCoOp, IVLP, MaPLe, PromptSRC).

How a learned text prompt reaches open_clip's own ``encode_text``:

1. :func:`prompt_tokens` builds one token row per class with *placeholder* ids where learned context goes, e.g. for
   ``n_ctx=4`` and ``class_token_position="end"``: ``[SOT] P P P P dog . [EOT]``. The placeholder is the
   start-of-text id (``vocab_size - 2`` in CLIP's vocabulary), which the tokenizer emits only at position 0, so a
   placeholder never collides with a word of a class name, and CLIP's argmax (end-of-text) pooling is unaffected.
2. An :class:`EmbedContextAdapter` on the ``text.embed`` site (the token embedding) replaces the embeddings at
   placeholder positions by the learned context (per class for class-specific context, per image for CoCoOp).
   It records the placeholder positions in the forward context.
3. Deep methods put a :class:`TextDeepPromptAdapter` on text blocks ``1..depth-1``: it overwrites the same
   positions of the block input with that layer's prompts (MaPLe/IVLP semantics: the prompt tokens are replaced,
   the sequence length and the causal mask stay). A :class:`VisionDeepPromptAdapter` on every image block inserts
   vision prompts after the class token (fresh prompts up to ``depth``, the previous block's prompt outputs after
   it) and removes them from the block output, so the image tower's layout is unchanged outside blocks.

All learnable tensors live in the method's shared :class:`PromptLearner` (``_shared.<method>.*``); the per-site
adapters are parameter-free views of it, which is what lets MaPLe couple vision prompts to text prompts.

Rows and classes: the text batch is either one row per class (``ClipClassifier``) or, for image-conditioned prompts,
``B * n`` rows in image-major order (row ``b * n + c``). Class-specific context reads the class of each row from
``PeftModel.conditioning(text_class_index=...)`` (default: row ``i`` is class ``i`` when there are exactly
``num_classes`` rows); CoCoOp reads ``conditioning(image_features=...)``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn as nn

from .base import Adapter, ForwardContext, Method, PeftConfig

if TYPE_CHECKING:  # pragma: no cover
    from ..backbones import BackboneSpec, Site

#: Forward-context keys that ``PeftModel.conditioning`` accepts for prompt learners.
CLASS_INDEX_KEY = "text_class_index"
IMAGE_FEATURES_KEY = "image_features"
POSITIONS = ("end", "middle", "front")


# --- tokenisation -----------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def default_tokenizer():
    """CLIP's BPE tokenizer (open_clip ``SimpleTokenizer``), the one every OpenAI/LAION CLIP model uses (built once:
    reading its vocabulary takes ~0.2 s)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def _check_tokenizer(tokenizer) -> None:
    for attr in ("encode", "sot_token_id", "eot_token_id", "context_length"):
        if not hasattr(tokenizer, attr):
            raise TypeError(f"prompt learning needs a CLIP BPE tokenizer (open_clip SimpleTokenizer) with `{attr}`; "
                            f"got {type(tokenizer).__name__}")


def prompt_tokens(tokenizer, classnames: Sequence[str], n_ctx: int, position: str = "end", fixed_words: str = "",
                  placeholder: Optional[int] = None, suffix: str = ".") -> torch.Tensor:
    """Token rows ``[SOT] <ctx> <fixed words> <class name><suffix> [EOT]`` with placeholder ids at context positions.

    Args:
        tokenizer: open_clip ``SimpleTokenizer`` (or one with ``encode``, ``sot_token_id``, ``eot_token_id``,
            ``context_length``).
        classnames: One name per class.
        n_ctx: Learned context tokens per row.
        position: Where the class name goes: ``"end"`` (after the context), ``"front"`` (before it) or
            ``"middle"`` (between its two halves), as in CoOp.
        fixed_words: Text kept as fixed tokens after the learned context (MaPLe/IVLP/PromptSRC initialise only the
            first ``n_ctx`` tokens of ``"a photo of a"`` and keep the rest as words).
        placeholder: Id written at context positions (default: the start-of-text id).
        suffix: Text after the class name (CoOp's ``"."``).

    Returns:
        ``(len(classnames), tokenizer.context_length)`` int64 tensor.

    Raises:
        ValueError: a prompt longer than the context length (names the class), an unknown position.
    """
    _check_tokenizer(tokenizer)
    if position not in POSITIONS:
        raise ValueError(f"class_token_position must be one of {POSITIONS}, got {position!r}")
    ph = tokenizer.sot_token_id if placeholder is None else placeholder
    fixed = tokenizer.encode(fixed_words) if fixed_words else []
    tail = tokenizer.encode(suffix) if suffix else []
    length = tokenizer.context_length
    out = torch.zeros(len(classnames), length, dtype=torch.long)
    for i, name in enumerate(classnames):
        name_ids = tokenizer.encode(name.replace("_", " "))
        if position == "end":
            body = [ph] * n_ctx + fixed + name_ids
        elif position == "front":
            body = name_ids + [ph] * n_ctx + fixed
        else:
            half = n_ctx // 2
            body = [ph] * half + name_ids + [ph] * (n_ctx - half) + fixed
        row = [tokenizer.sot_token_id] + body + tail + [tokenizer.eot_token_id]
        if len(row) > length:
            raise ValueError(f"the prompt for class {name!r} needs {len(row)} tokens, more than the context length "
                             f"{length}; use fewer context tokens or a shorter class name")
        out[i, :len(row)] = torch.tensor(row)
    return out


def init_context(model: nn.Module, embed: nn.Module, ctx_init: str, n_ctx: Optional[int],
                 name: str) -> tuple[torch.Tensor, str]:
    """Embeddings of the first ``n_ctx`` tokens of ``ctx_init`` and the words left over as fixed text.

    ``n_ctx=None`` takes all tokens of ``ctx_init`` (CoOp). Raises ``ValueError`` when the model's vocabulary is
    not CLIP's or ``ctx_init`` has fewer than ``n_ctx`` tokens.
    """
    tok = default_tokenizer()
    vocab = embed.weight.shape[0]
    if vocab != tok.vocab_size:
        raise ValueError(f"{name}.ctx_init needs CLIP's BPE vocabulary ({tok.vocab_size} tokens); this model's token "
                         f"embedding has {vocab}. Use ctx_init=None (random context)")
    ids = tok.encode(ctx_init.replace("_", " "))
    if not ids:
        raise ValueError(f"{name}.ctx_init {ctx_init!r} has no tokens")
    n = len(ids) if n_ctx is None else n_ctx
    if n > len(ids):
        raise ValueError(f"{name}: n_ctx={n} but ctx_init {ctx_init!r} has only {len(ids)} tokens; use n_ctx <= "
                         f"{len(ids)} or a longer ctx_init")
    with torch.no_grad():
        vec = embed.weight[torch.tensor(ids[:n], device=embed.weight.device)].detach().clone()
    return vec, tok.decode(ids[n:]).strip()


# --- the shared prompt learner ----------------------------------------------------------------------------------------

class PromptLearner(nn.Module):
    """Base of the shared module of text-prompt methods (all learnable tensors live here).

    Subclasses set ``ctx`` (``(n_ctx, d)`` or ``(n_cls, n_ctx, d)``) and override :meth:`context`,
    :meth:`text_prompt` and :meth:`vision_prompt` as needed.

    Attributes:
        n_ctx: Learned text context tokens per row.
        class_token_position: ``"end"``, ``"middle"`` or ``"front"``.
        fixed_words: Words after the context that stay fixed text.
        placeholder: Token id marking context positions.
        text_depth: Text blocks ``0..text_depth-1`` get learned prompts (block 0's come from the embedding).
        vision_depth: Image blocks ``0..vision_depth-1`` get fresh prompts; 0 means none.
        n_ctx_vision: Vision prompt tokens.
    """

    def __init__(self, n_ctx: int, placeholder: int, class_token_position: str = "end", fixed_words: str = "",
                 text_depth: int = 1, vision_depth: int = 0, n_ctx_vision: int = 0) -> None:
        super().__init__()
        self.n_ctx, self.placeholder = n_ctx, placeholder
        self.class_token_position, self.fixed_words = class_token_position, fixed_words
        self.text_depth, self.vision_depth, self.n_ctx_vision = text_depth, vision_depth, n_ctx_vision

    def tokenize(self, tokenizer, classnames: Sequence[str]) -> torch.Tensor:
        """Token rows of the learned prompts for ``classnames`` (see :func:`prompt_tokens`)."""
        return prompt_tokens(tokenizer, classnames, self.n_ctx, self.class_token_position, self.fixed_words,
                             self.placeholder)

    def prompt_template(self, classname: str = "{}") -> str:
        """Human-readable prompt with ``X`` for each learned token (for logs and result cards)."""
        ctx = " ".join(["X"] * self.n_ctx)
        fixed = f" {self.fixed_words}" if self.fixed_words else ""
        if self.class_token_position == "front":
            return f"{classname} {ctx}{fixed}."
        return f"{ctx}{fixed} {classname}."

    @property
    def conditioned(self) -> bool:
        """Whether the context depends on the image (CoCoOp): text rows are then per (image, class)."""
        return False

    def context(self, rows: int, ctx: ForwardContext) -> torch.Tensor:
        """Context embeddings ``(rows, n_ctx, d)`` for a text batch of ``rows`` rows."""
        c = self.ctx
        if c.dim() == 3:  # class-specific context
            return c[class_index(ctx, rows, c.shape[0])]
        return c.unsqueeze(0).expand(rows, -1, -1)

    def text_prompt(self, layer: int) -> Optional[torch.Tensor]:
        """Deep text prompts ``(n_ctx, d)`` for text block ``layer >= 1`` (``None``: none)."""
        return None

    def vision_prompt(self, layer: int) -> Optional[torch.Tensor]:
        """Vision prompts ``(n_ctx_vision, d_vision)`` for image block ``layer < vision_depth``."""
        return None


def class_index(ctx: ForwardContext, rows: int, num_classes: int) -> torch.Tensor:
    """The class of each text row (class-specific context)."""
    idx = ctx.get(CLASS_INDEX_KEY)
    if idx is None:
        if rows != num_classes:
            raise ValueError(f"class-specific context: the text batch has {rows} rows but the prompt learner has "
                             f"{num_classes} classes; pass the class of each row with "
                             "PeftModel.conditioning(text_class_index=...) (ClipClassifier does this)")
        return torch.arange(rows)
    idx = torch.as_tensor(idx)
    if idx.shape != (rows,):
        raise ValueError(f"text_class_index must have shape ({rows},) (one class per text row), got "
                         f"{tuple(idx.shape)}")
    return idx


def normal_(shape: Sequence[int], like: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """A fresh ``N(0, std^2)`` tensor on ``like``'s device and dtype (the papers' prompt initialisation)."""
    return torch.empty(*shape, device=like.device, dtype=like.dtype).normal_(0.0, std)


# --- adapters ---------------------------------------------------------------------------------------------------------

def _positions_key(method_key: str) -> tuple[str, str]:
    return (method_key, "text_ctx_positions")


class EmbedContextAdapter(Adapter):
    """On ``text.embed``: learned context replaces the embeddings at placeholder positions."""

    def __init__(self, site: Site, key: str) -> None:
        super().__init__(site)
        self.key = key

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: D102
        learner: PromptLearner = self.shared
        ctx = self.ctx
        pos = placeholder_positions(x, learner.placeholder, learner.n_ctx)
        ctx.set(_positions_key(self.key), pos)
        if pos is None:
            return y
        c = learner.context(x.shape[0], ctx).to(y.dtype)
        return y.scatter(1, pos.unsqueeze(-1).expand(-1, -1, y.shape[-1]), c)


def placeholder_positions(tokens: torch.Tensor, placeholder: int, n_ctx: int) -> Optional[torch.Tensor]:
    """``(rows, n_ctx)`` positions of the placeholder ids after position 0; ``None`` when no row has any."""
    mask = tokens == placeholder
    mask[:, 0] = False
    counts = mask.sum(dim=1)
    if not bool(counts.any()):
        return None
    if not bool((counts == n_ctx).all()):
        bad = counts.ne(n_ctx).nonzero()[0].item()
        raise ValueError(f"text row {bad} has {counts[bad].item()} context placeholders, expected {n_ctx} in every "
                         "row; build prompt tokens with the prompt learner's tokenize() (or ClipClassifier)")
    return mask.nonzero()[:, 1].view(tokens.shape[0], n_ctx)


class TextDeepPromptAdapter(Adapter):
    """On text block ``layer >= 1``: overwrites the context positions of the block input with that layer's prompts."""

    def __init__(self, site: Site, key: str) -> None:
        super().__init__(site)
        self.key = key

    def pre(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # noqa: D102
        pos = ctx.get(_positions_key(self.key))
        if pos is None:  # plain text (no placeholders): nothing to replace
            return x
        p = self.shared.text_prompt(self.site.layer).to(x.dtype)
        p = p.unsqueeze(0).expand(x.shape[0], -1, -1)
        return x.scatter(1, pos.unsqueeze(-1).expand(-1, -1, x.shape[-1]), p)


class VisionDeepPromptAdapter(Adapter):
    """On image block ``layer``: inserts vision prompts after the prefix tokens and removes them afterwards.

    Blocks below the learner's ``vision_depth`` get fresh prompts (block 0's pass through the tower's pre-norm, as
    prompts appended before ``ln_pre`` do in MaPLe/IVLP); deeper blocks get the previous block's prompt outputs.
    """

    def __init__(self, site: Site, key: str, num_prefix: int, num_tokens: int, depth: int, tower_depth: int,
                 pre_norm: Optional[nn.Module]) -> None:
        super().__init__(site)
        self.key, self.num_prefix, self.num_tokens = key, num_prefix, num_tokens
        self.fresh = site.layer < depth
        self.carry = site.layer + 1 < tower_depth and site.layer + 1 >= depth
        self.__dict__["_pre_norm"] = pre_norm  # the backbone's module: not an adapter parameter

    def pre(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # noqa: D102
        if self.fresh:
            p = self.shared.vision_prompt(self.site.layer).to(x.dtype)
            if self.__dict__["_pre_norm"] is not None:
                p = self.__dict__["_pre_norm"](p)
            p = p.unsqueeze(0).expand(x.shape[0], -1, -1)
        else:
            p = ctx.get((self.key, "vision_carry", self.site.layer))
            if p is None:
                raise RuntimeError(f"{self.key}: no carried vision prompts reached image block {self.site.layer}; "
                                   "blocks must run in order within one forward")
        n = self.num_prefix
        return torch.cat([x[:, :n], p, x[:, n:]], dim=1)

    def post(self, y: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # noqa: D102
        n, t = self.num_prefix, self.num_tokens
        if self.carry:
            ctx.set((self.key, "vision_carry", self.site.layer + 1), y[:, n:n + t])
        return torch.cat([y[:, :n], y[:, n + t:]], dim=1)


# --- the method base --------------------------------------------------------------------------------------------------

class TextPromptMethod(Method):
    """Base of CLIP prompt-learning methods: fixed sites (text embed, deep text blocks, image blocks)."""

    site_kinds = ("embed", "block")
    #: Whether the method has vision prompts (IVLP, MaPLe, PromptSRC).
    uses_vision: bool = False

    def text_depth(self) -> int:
        """Text blocks with learned prompts (1 = the embedding only)."""
        return 1

    def vision_depth(self) -> int:
        """Image blocks with fresh learned prompts."""
        return 0

    def resolve(self, model: nn.Module, spec: BackboneSpec) -> list[Site]:  # noqa: D102
        cfg = self.config
        name = type(cfg).__name__
        for f in ("targets", "layers", "towers"):
            if getattr(cfg, f) is not None:
                raise ValueError(f"{name}.{f} must be None: prompt learning attaches to fixed sites (the text "
                                 "token embedding, the first text/image blocks up to the prompt depth)")
        if "text" not in spec.towers:
            raise ValueError(f"{name} needs a CLIP model with a text tower (open_clip CLIP); backbone family "
                             f"{spec.family!r} has towers {sorted(t or '(main)' for t in spec.towers)}")
        text = spec.towers["text"]
        if text.layout != "NLC":
            raise ValueError(f"{name}: the text tower runs in {text.layout} layout; prompt learning needs NLC "
                             "(batch-first) blocks")
        if self.text_depth() > text.depth:
            raise ValueError(f"{name}: text prompt depth {self.text_depth()} exceeds the text tower's "
                             f"{text.depth} blocks")
        sites = spec.resolve(model, "text.embed")
        if self.text_depth() > 1:
            sites += spec.resolve(model, "text.block", layers=list(range(1, self.text_depth())))
        if self.uses_vision:
            if "visual" not in spec.towers:
                raise ValueError(f"{name} needs a ViT image tower (vision prompts); this open_clip model's image "
                                 "tower is not a VisionTransformer. CoOp and CoCoOp work with any image tower")
            vis = spec.towers["visual"]
            if vis.layout != "NLC":
                raise ValueError(f"{name}: the image tower runs in {vis.layout} layout; vision prompts need NLC")
            if self.vision_depth() > vis.depth:
                raise ValueError(f"{name}: vision prompt depth {self.vision_depth()} exceeds the image tower's "
                                 f"{vis.depth} blocks")
            sites += spec.resolve(model, "visual.block")
        for s in sites:
            self.check_site(model, spec, s)
        return sites

    def make_adapter(self, model, spec, sites, module, shared):  # noqa: D102
        site = sites[0]
        if site.kind == "embed":
            return EmbedContextAdapter(site, self.key)
        if site.tower == "text":
            return TextDeepPromptAdapter(site, self.key)
        tower = spec.towers["visual"]
        pre = tower.global_sites.get("pre_norm")
        pre_norm = model.get_submodule(pre) if (pre and site.layer == 0) else None
        return VisionDeepPromptAdapter(site, self.key, tower.num_prefix_tokens, shared.n_ctx_vision,
                                       self.vision_depth(), tower.depth, pre_norm)

    def token_embedding(self, model: nn.Module, spec: BackboneSpec) -> nn.Module:
        """The text tower's token embedding module."""
        return model.get_submodule(spec.towers["text"].global_sites["embed"])

    def image_embed_dim(self, model: nn.Module) -> int:
        """Dimension of ``encode_image`` features (CoCoOp's meta-net input)."""
        visual = getattr(model, "visual", None)
        dim = getattr(visual, "output_dim", None)
        if not isinstance(dim, int):
            raise ValueError(f"{type(self.config).__name__}: cannot tell the image feature dimension of "
                             f"{type(model).__name__} (no visual.output_dim)")
        return dim


def check_positive_int(cfg: PeftConfig, field_name: str, minimum: int = 1, allow_none: bool = False) -> None:
    """``ValueError`` unless ``cfg.<field_name>`` is an int ``>= minimum`` (or None when allowed)."""
    v = getattr(cfg, field_name)
    if v is None and allow_none:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"{type(cfg).__name__}.{field_name} must be an int >= {minimum}"
                         f"{' or None' if allow_none else ''}, got {v!r}")


__all__ = ["CLASS_INDEX_KEY", "IMAGE_FEATURES_KEY", "EmbedContextAdapter", "PromptLearner", "TextDeepPromptAdapter",
           "TextPromptMethod", "VisionDeepPromptAdapter", "default_tokenizer", "init_context",
           "placeholder_positions", "prompt_tokens"]
