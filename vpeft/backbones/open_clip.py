"""open_clip CLIP models (image and text towers): creation and spec.

Both packed attention layouts are supported, keyed on the module actually present: ``nn.MultiheadAttention``
(open_clip 3.x ``ResidualAttentionBlock``) and open_clip's own ``Attention`` with a raw ``in_proj_weight``
Parameter (``CustomResidualAttentionBlock``, and the default block of newer open_clip).
"""

from __future__ import annotations

import difflib
import logging
import os
from typing import Optional, Union

import torch.nn as nn

from ._spec import BackboneSpec, TowerSpec, register_spec

#: Scalar entries of state dicts taken from OpenAI's TorchScript CLIP archives (``jit_model.state_dict()``); they
#: are not weights. open_clip drops them only when it loads the archive itself.
_OPENAI_SCALAR_KEYS = ("input_resolution", "context_length", "vocab_size")


def _quick_gelu_for(arch: str, tag: Optional[str]) -> bool:
    """Whether ``arch`` with pretrained ``tag`` needs QuickGELU (OpenAI weights do; DESIGN section 10).

    open_clip switches to QuickGELU itself only when it downloads a tag; here the tag decides also for local files.
    ``openai`` means QuickGELU for every architecture, also ones open_clip has no pretrained config for.
    """
    import open_clip

    if tag is None or arch.endswith("-quickgelu"):
        return False
    cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    return bool(cfg.get("quick_gelu", tag.lower().replace("-", "_") == "openai"))


class _DropRandomInitNotice(logging.Filter):
    """Hides open_clip's "initialized randomly" warning while vpeft builds a model it loads weights into next."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def create_open_clip(
        arch: str,
        tag: Optional[str] = None,
        pretrained: Union[bool, str, os.PathLike] = False,
        **kwargs,
) -> nn.Module:
    """Create an open_clip model ``arch`` (e.g. ``"ViT-B-16"``), optionally loading weights.

    Args:
        arch: open_clip model config name.
        tag: Pretrained tag (``"openai"``, ``"laion2b_s34b_b88k"``, ...). It selects the activation the weights
            were trained with: for ``openai`` QuickGELU is forced also when weights come from a local file. For an
            architecture with registered tags it must be one of them.
        pretrained: False (random init), True (open_clip's hub download of ``tag``), or a local checkpoint path
            (open_clip ``.bin``/``.pt``/``.safetensors``, or an OpenAI-CLIP-format state dict, whose scalar
            ``input_resolution``/``context_length``/``vocab_size`` entries are ignored). The file is read by open_clip's
            loader with ``weights_only=True``; every model key must be present and no other key may be.
        **kwargs: Forwarded to ``open_clip.create_model``.

    Raises:
        ValueError: unknown architecture or tag, a path that is not a loadable file, or a checkpoint whose keys or
            shapes do not fit the architecture.
        TypeError: ``pretrained`` is neither a bool nor a path.
    """
    import open_clip

    models = open_clip.list_models()
    if arch not in models:
        close = difflib.get_close_matches(arch, models, n=5)
        raise ValueError(f"open_clip has no model config {arch!r}; close matches: {close}; available: {models}")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag is not None and tags and not open_clip.get_pretrained_cfg(arch, tag):
        raise ValueError(f"open_clip model {arch!r} has no pretrained tag {tag!r}; tags: {tags}")
    force_quick_gelu = kwargs.pop("force_quick_gelu", False) or _quick_gelu_for(arch, tag)
    if isinstance(pretrained, (str, os.PathLike)):
        from . import _local_checkpoint

        path = _local_checkpoint(pretrained)
        root = logging.getLogger()
        quiet = _DropRandomInitNotice()
        root.addFilter(quiet)
        try:
            model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=force_quick_gelu, **kwargs)
        finally:
            root.removeFilter(quiet)
        _load_checkpoint(model, path, arch)
        return model
    if pretrained is True:
        if tag is None:
            raise ValueError(f"pretrained=True needs a tag, e.g. 'open_clip:{arch}/openai'; tags for {arch}: {tags}")
        source: Optional[str] = tag
    elif pretrained is False:
        source = None
    else:
        raise TypeError(f"pretrained must be True, False or a checkpoint path, got {type(pretrained).__name__}")
    return open_clip.create_model(arch, pretrained=source, force_quick_gelu=force_quick_gelu, **kwargs)


def _load_checkpoint(model: nn.Module, path: str, arch: str) -> None:
    """open_clip's checkpoint loader (key conversions, position-embedding resizing), strict except for the scalar
    entries of OpenAI-format state dicts."""
    import open_clip

    try:
        result = open_clip.load_checkpoint(model, path, strict=False, weights_only=True)
    except RuntimeError as e:  # size mismatches (torch raises them also with strict=False)
        raise ValueError(f"checkpoint {path!r} could not be loaded into open_clip {arch!r}: {e}") from e
    missing = list(getattr(result, "missing_keys", []))
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if k not in _OPENAI_SCALAR_KEYS]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path!r} does not fit open_clip {arch!r}: {len(missing)} missing keys "
                         f"{missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}")


def _oc_classes():
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.transformer import TextTransformer, VisionTransformer

    return CLIP, CustomTextCLIP, VisionTransformer, TextTransformer


_BLOCK_SITES = {"norm1": "ln_1", "attn": "attn", "attn_out": "attn.out_proj", "norm2": "ln_2", "mlp": "mlp",
                "mlp_in": "mlp.c_fc", "mlp_out": "mlp.c_proj"}


def _transformer_tower(name: str, prefix: str, transformer: nn.Module, global_sites: dict, **kw) -> TowerSpec:
    blk = transformer.resblocks[0]
    attn = blk.attn
    return TowerSpec(
        name=name,
        depth=len(transformer.resblocks),
        width=transformer.width,
        num_heads=attn.num_heads,
        block=prefix + "transformer.resblocks.{i}",
        block_sites=dict(_BLOCK_SITES),
        global_sites=global_sites,
        attention="packed",
        layout="NLC" if getattr(transformer, "batch_first", True) else "LNC",
        **kw,
    )


def _visual_tower(name: str, visual: nn.Module, prefix: str) -> TowerSpec:
    _, _, VisionTransformer, _ = _oc_classes()
    if not isinstance(visual, VisionTransformer):
        raise TypeError(f"open_clip image tower {type(visual).__name__} is not a ViT; vpeft's site-based methods "
                        "support open_clip's VisionTransformer image tower")
    sites = {"embed": prefix + "conv1", "final_norm": prefix + "ln_post"}
    if not isinstance(visual.ln_pre, nn.Identity):
        sites["pre_norm"] = prefix + "ln_pre"
    return _transformer_tower(name, prefix, visual.transformer, sites, num_prefix_tokens=1, embed_channel_dim=1)


def _text_tower(name: str, text: nn.Module, prefix: str) -> TowerSpec:
    sites = {"embed": prefix + "token_embedding", "final_norm": prefix + "ln_final"}
    return _transformer_tower(name, prefix, text.transformer, sites, num_prefix_tokens=0, causal=True)


def _is_oc(model: nn.Module) -> bool:
    try:
        return isinstance(model, _oc_classes())
    except ImportError:  # pragma: no cover
        return False


@register_spec(_is_oc)
def open_clip_spec(model: nn.Module) -> BackboneSpec:
    """Spec of an open_clip ``CLIP`` / ``CustomTextCLIP`` model or of one of its towers on its own."""
    CLIP, CustomTextCLIP, VisionTransformer, TextTransformer = _oc_classes()
    if isinstance(model, VisionTransformer):
        return BackboneSpec("open_clip_visual", {"": _visual_tower("", model, "")}, ("",))
    if isinstance(model, TextTransformer):
        return BackboneSpec("open_clip_text", {"": _text_tower("", model, "")}, ("",))
    # A ResNet image tower (RN50 ...) has no transformer sites: the model then exposes its text tower only, which is
    # all that text-prompt methods (CoOp, CoCoOp) and the zero-shot head need.
    towers = {}
    if isinstance(model.visual, VisionTransformer):
        towers["visual"] = _visual_tower("visual", model.visual, "visual.")
    if isinstance(model, CustomTextCLIP):
        if not isinstance(model.text, TextTransformer):
            raise TypeError(f"open_clip text tower {type(model.text).__name__} is not supported (only open_clip's "
                            "TextTransformer)")
        towers["text"] = _text_tower("text", model.text, "text.")
    else:
        towers["text"] = _text_tower("text", model, "")
    if "visual" not in towers:
        return BackboneSpec("open_clip_resnet", towers, ("text",))
    return BackboneSpec("open_clip", towers, ("visual",))
