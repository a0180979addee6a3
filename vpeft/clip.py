"""CLIP classification heads: the zero-shot classifier builder and ``ClipClassifier`` (zero-shot, prompt learning and
CLIP fine-tuning share it).

``build_zero_shot_classifier`` is open_clip's builder (template ensembling: per class the mean of the normalised
features of every template, normalised again; chunked over classes) with input checks instead of asserts.
``ClipClassifier`` turns any open_clip model, plain or a ``PeftModel``, into ``images -> logits``
``logit_scale * norm(image) @ norm(text).T (+ logit_bias)``:

* with a text-prompt method attached (CoOp, CoCoOp, IVLP, MaPLe, PromptSRC) the class texts are the learned
  prompts; otherwise the templates (default ``"a photo of a {}."``);
* class embeddings are cached while nothing on the text side can change (no trainable text-side parameter under
  autograd, and the same parameter versions as when cached) and re-encoded otherwise;
* text is encoded in chunks of ``class_chunk`` classes; under autograd with several chunks each chunk is
  recomputed in backward (activation checkpointing), so the activation memory of prompt learning is that of one
  chunk whatever the number of classes (DESIGN section 10: CoOp's ImageNet out-of-memory).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .methods._text_prompts import CLASS_INDEX_KEY, IMAGE_FEATURES_KEY, PromptLearner
from .methods.peft_model import PeftModel

Template = Union[str, Callable[[str], str]]
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


def _check_names(classnames: Sequence[str], templates: Optional[Sequence[Template]]) -> None:
    if isinstance(classnames, str) or not isinstance(classnames, Sequence) or not classnames:
        raise ValueError("classnames must be a non-empty sequence of strings")
    if not all(isinstance(c, str) for c in classnames):
        raise TypeError(f"classnames must be strings, got {[type(c).__name__ for c in classnames][:5]}")
    if templates is not None:
        if isinstance(templates, str) or not isinstance(templates, Sequence) or not templates:
            raise ValueError("templates must be a non-empty sequence of format strings ('a photo of a {}.') or "
                             "callables (open_clip's OPENAI_IMAGENET_TEMPLATES)")
        for t in templates:
            if isinstance(t, str) and "{}" not in t and "{c}" not in t:
                raise ValueError(f"template {t!r} has no '{{}}' placeholder for the class name")
            if not isinstance(t, str) and not callable(t):
                raise TypeError(f"a template must be a format string or a callable, got {type(t).__name__}")


def _apply(template: Template, name: str) -> str:
    if callable(template):
        return template(name)
    return template.format(name) if "{}" in template else template.format(c=name)


def template_texts(classnames: Sequence[str], templates: Sequence[Template]) -> list[str]:
    """All prompts, class-major: ``[t0(c0), t1(c0), ..., t0(c1), ...]``."""
    return [_apply(t, c) for c in classnames for t in templates]


def _encode_classes(model: nn.Module, tokens: torch.Tensor, num_templates: int) -> torch.Tensor:
    """Normalised class embeddings ``(n, D)`` from class-major template tokens ``(n * T, L)``."""
    emb = model.encode_text(tokens, normalize=True)
    emb = emb.reshape(tokens.shape[0] // num_templates, num_templates, -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


def build_zero_shot_classifier(
        model: nn.Module,
        tokenizer: Callable,
        classnames: Sequence[str],
        templates: Sequence[Template],
        num_classes_per_batch: Optional[int] = 10,
        device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """Zero-shot classifier weights ``(D, C)`` (open_clip's layout): per class the normalised mean of the normalised
    text features of all templates.

    Args:
        model: open_clip CLIP (or a ``PeftModel`` wrapping one).
        tokenizer: open_clip tokenizer (``open_clip.get_tokenizer(arch)``).
        classnames: Class names in label order.
        templates: Format strings with ``{}`` (or ``{c}``) or callables ``name -> text``.
        num_classes_per_batch: Classes per text forward (``None``: all at once).
        device: Where to run; default the model's device.

    Raises:
        ValueError / TypeError: empty or malformed class names or templates, a bad batch size.
    """
    _check_names(classnames, templates)
    if num_classes_per_batch is not None and (not isinstance(num_classes_per_batch, int) or num_classes_per_batch < 1):
        raise ValueError(f"num_classes_per_batch must be a positive int or None, got {num_classes_per_batch!r}")
    if device is None:
        device = next(model.parameters()).device
    step = num_classes_per_batch or len(classnames)
    out = []
    with torch.no_grad():
        for i in range(0, len(classnames), step):
            names = classnames[i:i + step]
            tokens = tokenizer(template_texts(names, templates)).to(device)
            out.append(_encode_classes(model, tokens, len(templates)))
    return torch.cat(out).T


def find_prompt_learner(model: nn.Module) -> Optional[PromptLearner]:
    """The text-prompt learner attached to ``model`` (a ``PeftModel``), if any.

    Raises:
        ValueError: more than one text-prompt method is attached.
    """
    if not isinstance(model, PeftModel):
        return None
    found = [(k, m) for k, m in model.shared.items() if isinstance(m, PromptLearner)]
    if len(found) > 1:
        raise ValueError(f"more than one text-prompt method is attached ({[k for k, _ in found]}); ClipClassifier "
                         "supports one")
    return found[0][1] if found else None


class ClipClassifier(nn.Module):
    """``images -> logits`` for an open_clip model over a fixed list of classes.

    Args:
        model: open_clip CLIP, or a ``PeftModel`` wrapping one (adapters on either tower, text prompts...).
        tokenizer: open_clip tokenizer (CLIP's BPE ``SimpleTokenizer`` for prompt learning).
        classnames: Class names in label order.
        templates: Prompt templates for classes without a prompt learner (default ``["a photo of a {}."]``);
            several templates are ensembled as in :func:`build_zero_shot_classifier`. Underscores in class names
            become spaces in both templates and learned prompts.
        class_chunk: Classes per text forward (for CoCoOp: ``class_chunk // batch`` classes per forward, so rows per
            forward stay bounded).
        checkpoint_chunks: Recompute each chunk in backward when there are several (bounded activation memory).
    """

    def __init__(self, model: nn.Module, tokenizer: Callable, classnames: Sequence[str],
                 templates: Optional[Sequence[Template]] = None, class_chunk: int = 100,
                 checkpoint_chunks: bool = True) -> None:
        super().__init__()
        _check_names(classnames, templates)
        if not isinstance(class_chunk, int) or isinstance(class_chunk, bool) or class_chunk < 1:
            raise ValueError(f"class_chunk must be a positive int, got {class_chunk!r}")
        if not hasattr(model, "encode_text") or not hasattr(model, "encode_image"):
            raise TypeError(f"ClipClassifier needs an open_clip model with encode_image/encode_text, got "
                            f"{type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.classnames = list(classnames)
        self.templates = list(templates) if templates is not None else list(DEFAULT_TEMPLATES)
        self.class_chunk = class_chunk
        self.checkpoint_chunks = checkpoint_chunks
        self.learner = find_prompt_learner(model)
        device = next(model.parameters()).device
        # Underscores in class names become spaces, as in the learned prompts (CoOp's convention).
        names = [c.replace("_", " ") for c in self.classnames]
        self.register_buffer("template_tokens", tokenizer(template_texts(names, self.templates)).to(device),
                             persistent=False)
        prompt = self.learner.tokenize(tokenizer, self.classnames).to(device) if self.learner is not None else None
        self.register_buffer("prompt_tokens", prompt, persistent=False)
        self._cache: Optional[tuple[tuple, torch.Tensor]] = None

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classnames)

    # -- text side -------------------------------------------------------------------------------------------------
    def _prompting(self) -> bool:
        """Whether learned prompts are used (a learner is attached and adapters are enabled)."""
        return self.learner is not None and self.model.runtime.enabled

    def text_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that text features depend on (prompt learner, text-tower adapters and weights)."""
        model = self.model
        if isinstance(model, PeftModel):
            params = list(self.learner.parameters()) if self.learner is not None else []
            for layer in model.adapter_layers().values():
                if layer.site.tower == "text":
                    params += [p for _, a in layer.adapters() for p in a.parameters()]
            params += [p for n, p in model.base_model.named_parameters()
                       if p.requires_grad and not n.startswith("visual.")]
        else:
            params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("visual.")]
        return [p for p in params if p.requires_grad]

    def _cache_key(self) -> tuple:
        enabled = self.model.runtime.enabled if isinstance(self.model, PeftModel) else True
        merged = self.model.merged if isinstance(self.model, PeftModel) else False
        return (enabled, merged, self.training) + tuple((id(p), p._version) for p in self.text_parameters())

    def _chunked(self, fn: Callable[..., torch.Tensor], n: int, step: int, *args) -> torch.Tensor:
        """``cat(fn(lo, hi, *args))`` over class chunks; each chunk checkpointed when grads flow and n > step."""
        recompute = self.checkpoint_chunks and torch.is_grad_enabled() and n > step and bool(self.text_parameters())
        out = []
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            if recompute:
                out.append(checkpoint(fn, lo, hi, *args, use_reentrant=False))
            else:
                out.append(fn(lo, hi, *args))
        return torch.cat(out)

    def _encode_prompts(self, lo: int, hi: int) -> torch.Tensor:
        idx = torch.arange(lo, hi, device=self.prompt_tokens.device)
        with self.model.conditioning(**{CLASS_INDEX_KEY: idx}):
            return self.model.encode_text(self.prompt_tokens[lo:hi], normalize=True)

    def _encode_templates(self, lo: int, hi: int) -> torch.Tensor:
        t = len(self.templates)
        return _encode_classes(self.model, self.template_tokens[lo * t:hi * t], t)

    def class_embeddings(self) -> torch.Tensor:
        """Normalised class embeddings ``(C, D)`` (cached while the text side cannot change)."""
        if self.learner is not None and self.learner.conditioned and self._prompting():
            raise ValueError("image-conditioned prompts (CoCoOp) have no per-class embeddings; call forward(images)")
        cacheable = not (torch.is_grad_enabled() and self.text_parameters())
        key = self._cache_key()
        if cacheable and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        if self._prompting():
            emb = self._chunked(self._encode_prompts, self.num_classes, self.class_chunk)
        else:
            emb = self._chunked(self._encode_templates, self.num_classes, self.class_chunk)
        self._cache = (key, emb.detach()) if cacheable else None
        return emb

    def _encode_conditioned(self, lo: int, hi: int, feats: torch.Tensor) -> torch.Tensor:
        """CoCoOp: text features ``(B, hi - lo, D)`` of classes ``lo:hi`` conditioned on each image."""
        b = feats.shape[0]
        tokens = self.prompt_tokens[lo:hi].repeat(b, 1)  # image-major rows: b * n + c
        with self.model.conditioning(**{IMAGE_FEATURES_KEY: feats}):
            t = self.model.encode_text(tokens, normalize=True)
        return t.view(b, hi - lo, -1).transpose(0, 1)  # (n, B, D) so chunks concatenate over classes

    # -- forward ---------------------------------------------------------------------------------------------------
    def logit_scale(self) -> torch.Tensor:
        """``exp(model.logit_scale)``."""
        return self.model.logit_scale.exp()

    def forward(self, images: torch.Tensor, return_features: bool = False):
        """Class logits ``(B, C)``; with ``return_features`` also the normalised image features ``(B, D)`` and
        class features (``(C, D)``, or ``(B, C, D)`` for image-conditioned prompts)."""
        img = F.normalize(self.model.encode_image(images), dim=-1)
        scale = self.logit_scale()
        if self.learner is not None and self.learner.conditioned and self._prompting():
            step = max(1, self.class_chunk // img.shape[0])
            text = self._chunked(self._encode_conditioned, self.num_classes, step, img).transpose(0, 1)
            logits = scale * torch.einsum("bd,bcd->bc", img, text)
        else:
            text = self.class_embeddings()
            logits = scale * img @ text.T
        bias = getattr(self.model, "logit_bias", None)
        if bias is not None:
            logits = logits + bias
        return (logits, img, text) if return_features else logits


def tokenizer_for(backbone: str, model: Optional[nn.Module] = None):
    """open_clip's tokenizer for an ``open_clip:ARCH[/TAG]`` backbone id, at the model's context length.

    Raises:
        ValueError: a backbone that is not an open_clip model.
    """
    import open_clip

    family, _, name = backbone.partition(":")
    if family != "open_clip" or not name:
        raise ValueError(f"CLIP tasks need an open_clip backbone ('open_clip:ViT-B-16/openai'), got {backbone!r}")
    arch = name.partition("/")[0]
    context_length = getattr(model, "context_length", None) if model is not None else None
    return open_clip.get_tokenizer(arch, context_length=context_length)


def clean_classnames(classnames: Sequence[str]) -> list[str]:
    """Class names as CoOp writes them into prompts (underscores as spaces).

    Raises:
        ValueError / TypeError: not a non-empty sequence of strings.
    """
    if isinstance(classnames, str) or not isinstance(classnames, Sequence) or not classnames:
        raise ValueError(f"classnames must be a non-empty list of strings, got {classnames!r}")
    if not all(isinstance(c, str) for c in classnames):
        raise TypeError(f"classnames must be strings, got {[type(c).__name__ for c in classnames][:5]}")
    return [c.replace("_", " ") for c in classnames]
