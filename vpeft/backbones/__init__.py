"""Backbone creation (``create_backbone``) and the per-family site specs."""

from __future__ import annotations

import os
import zipfile
from typing import Callable, Union

import torch.nn as nn

# The family modules are imported for their spec registrations, so that get_spec also works on a model built
# directly with timm / open_clip; they import timm and open_clip lazily, inside functions.
from . import open_clip as _open_clip_family  # noqa: F401
from . import timm_vit as _timm_family  # noqa: F401
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


# Families that register themselves with register_backbone (so imported after it is defined).
from . import point_mae as _point_family  # noqa: E402,F401
from . import sam as _sam_family  # noqa: E402,F401


def _local_checkpoint(pretrained: Union[str, os.PathLike]) -> str:
    """The path of a local checkpoint file, checked before any model is built.

    Raises:
        ValueError: the path is not a file, or it is a TorchScript archive (OpenAI's original CLIP ``.pt`` release),
            which ``torch.load(weights_only=True)`` refuses and vpeft does not execute.
    """
    path = os.fspath(pretrained)
    if not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
        raise ValueError(f"pretrained checkpoint {path!r} {what} (pretrained accepts True, False or a checkpoint "
                         "file path: .pth/.pt/.bin, .safetensors, or .npz for timm ViTs)")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.endswith("constants.pkl") for n in z.namelist()):
                raise ValueError(
                    f"pretrained checkpoint {path!r} is a TorchScript archive (e.g. OpenAI's original CLIP .pt "
                    "release); vpeft loads plain state dicts only (torch.load(weights_only=True) or safetensors). "
                    "Convert it once, in an environment you trust: "
                    "torch.save(torch.jit.load(path, map_location='cpu').state_dict(), 'state_dict.pt')")
    return path


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
        ValueError: malformed id, unknown family, model name or pretrained tag, or a checkpoint path that is not a
            loadable file.
        TypeError: ``backbone_id`` is not a string, or ``pretrained`` is neither a bool nor a path.
    """
    if not isinstance(backbone_id, str):
        raise TypeError(f"backbone id must be a string '<family>:<name>' (families: {list_backbones()}), "
                        f"got {type(backbone_id).__name__}")
    if ":" not in backbone_id:
        raise ValueError(f"backbone id must look like '<family>:<name>' (families: {list_backbones()}), "
                         f"got {backbone_id!r}")
    family, name = backbone_id.split(":", 1)
    if family not in _FAMILIES:
        raise ValueError(f"unknown backbone family {family!r} in {backbone_id!r}; families: {list_backbones()}")
    model = _FAMILIES[family](name, pretrained, **kwargs)
    model.vpeft_backbone_id = backbone_id
    return model
