"""Backbone creation (``create_backbone``) and the per-family site specs."""

from __future__ import annotations

import os
from typing import Callable, Union

import torch.nn as nn

from ._spec import ALL_SITES, BackboneSpec, Site, TowerSpec, get_spec, register_spec

__all__ = ["ALL_SITES", "BackboneSpec", "Site", "TowerSpec", "create_backbone", "get_spec", "list_backbones",
           "register_backbone", "register_spec"]

_FAMILIES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(prefix: str):
    """Register ``fn(name, pretrained, **kwargs) -> nn.Module`` for ids ``"<prefix>:<name>"`` (decorator)."""

    def deco(fn):
        _FAMILIES[prefix] = fn
        return fn

    return deco


@register_backbone("timm")
def _timm(name: str, pretrained, **kwargs) -> nn.Module:
    from .timm_vit import create_timm

    return create_timm(name, pretrained, **kwargs)


@register_backbone("open_clip")
def _open_clip(name: str, pretrained, **kwargs) -> nn.Module:
    from .open_clip import create_open_clip

    arch, _, tag = name.partition("/")
    return create_open_clip(arch, tag or None, pretrained, **kwargs)


def list_backbones() -> list[str]:
    """Registered backbone family prefixes, e.g. ``["open_clip", "timm"]``."""
    return sorted(_FAMILIES)


def create_backbone(backbone_id: str, pretrained: Union[bool, str, os.PathLike] = False, **kwargs) -> nn.Module:
    """Create a backbone from an id such as ``"timm:vit_base_patch16_224.augreg2_in21k_ft_in1k"`` or
    ``"open_clip:ViT-B-16/openai"``.

    Args:
        backbone_id: ``"<family>:<name>"``; see :func:`list_backbones` for families.
        pretrained: False (random init), True (the family's normal hub download; online only) or the path of a
            local checkpoint in the official format (the offline path).
        **kwargs: Forwarded to the family's factory (e.g. ``num_classes`` for timm).

    Returns:
        The plain timm / open_clip module; ``model.vpeft_backbone_id`` records the id (stored in adapter files).

    Raises:
        ValueError: malformed id, unknown family or model name, or a checkpoint path that does not exist.
    """
    if not isinstance(backbone_id, str) or ":" not in backbone_id:
        raise ValueError(f"backbone id must look like '<family>:<name>' (families: {list_backbones()}), "
                         f"got {backbone_id!r}")
    family, name = backbone_id.split(":", 1)
    if family not in _FAMILIES:
        raise ValueError(f"unknown backbone family {family!r} in {backbone_id!r}; families: {list_backbones()}")
    model = _FAMILIES[family](name, pretrained, **kwargs)
    model.vpeft_backbone_id = backbone_id
    return model
