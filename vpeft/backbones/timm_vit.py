"""timm Vision Transformers (``vit_*``, ``deit_*``, CLIP-style ``vit_*_clip_*``): creation and spec."""

from __future__ import annotations

import os
from typing import Union

import torch.nn as nn

from ._spec import BackboneSpec, TowerSpec, register_spec


def create_timm(name: str, pretrained: Union[bool, str, os.PathLike] = False, **kwargs) -> nn.Module:
    """Create a timm model; ``pretrained`` is False, True (timm's hub download) or a local checkpoint path.

    A path goes through timm's own loader (``pretrained_cfg_overlay=dict(file=...)``), so the model's
    ``checkpoint_filter_fn`` remaps official key formats and a classifier of another size is dropped exactly as
    timm does for hub weights. timm loads ``.pth``/``.bin`` with ``weights_only=True`` and ``.safetensors`` natively.
    """
    import timm

    if not timm.is_model(name.split(".")[0]):
        raise ValueError(f"timm has no model named {name.split('.')[0]!r}; see timm.list_models() for names")
    if isinstance(pretrained, (str, os.PathLike)):
        path = os.fspath(pretrained)
        if not os.path.isfile(path):
            raise ValueError(f"pretrained checkpoint {path!r} does not exist (pass True, False or a file path)")
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs)
    if not isinstance(pretrained, bool):
        raise TypeError(f"pretrained must be bool or a path, got {type(pretrained).__name__}")
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _is_timm_vit(model: nn.Module) -> bool:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, VisionTransformer)


@register_spec(_is_timm_vit)
def timm_vit_spec(model: nn.Module) -> BackboneSpec:
    """Spec of a timm ``VisionTransformer``: fused ``qkv`` Linear per block, pre-norm blocks."""
    blk = model.blocks[0]
    if not hasattr(blk, "attn") or not isinstance(getattr(blk.attn, "qkv", None), nn.Linear):
        raise TypeError(f"timm block type {type(blk).__name__} has no fused attn.qkv Linear; vpeft supports the "
                        "standard timm ViT Block (pre-norm, fused qkv)")
    global_sites = {"embed": "patch_embed.proj"}
    if not isinstance(model.norm_pre, nn.Identity):
        global_sites["pre_norm"] = "norm_pre"
    # Token-pooled models normalise with `norm`; average-pooled ones with `fc_norm` (and `norm` is Identity).
    final = "norm" if not isinstance(model.norm, nn.Identity) else "fc_norm"
    if not isinstance(model.get_submodule(final), nn.Identity):
        global_sites["final_norm"] = final
    if not isinstance(model.head, nn.Identity):
        global_sites["head"] = "head"
    tower = TowerSpec(
        name="",
        depth=len(model.blocks),
        width=model.embed_dim,
        num_heads=blk.attn.num_heads,
        block="blocks.{i}",
        block_sites={"norm1": "norm1", "attn": "attn", "qkv": "attn.qkv", "attn_out": "attn.proj",
                     "norm2": "norm2", "mlp_in": "mlp.fc1", "mlp_out": "mlp.fc2"},
        global_sites=global_sites,
        attention="fused_linear",
        num_prefix_tokens=model.num_prefix_tokens,
        embed_channel_dim=1,
    )
    return BackboneSpec("timm_vit", {"": tower}, ("",))
