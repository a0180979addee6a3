"""Tiny timm / open_clip backbones for the backbone tests; nothing here downloads.

(Named ``_backbone_helpers`` rather than ``_helpers``: test folders are not packages, so a second ``_helpers.py``
elsewhere under tests/ would shadow this one in ``sys.modules``.)
"""

from __future__ import annotations

import json
import tempfile
from typing import Optional

import torch
import torch.nn as nn

TIMM_ARCH = "vit_tiny_patch16_224"
#: depth 2, width 64, 4 heads, 32x32 images in 8x8 patches (16 patch tokens + a class token).
TIMM_KW = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
WIDTH = 64

#: open_clip configs registered through ``open_clip.add_model_config`` (a json file per name, as open_clip ships
#: its own). Names differ from tests/conftest.py's ``vpeft-tiny-ViT`` so neither registration shadows the other.
CLIP = "vpeft-bb-tiny"
CLIP_QK_NORM = "vpeft-bb-tiny-qknorm"  # CustomResidualAttentionBlock: open_clip's Attention, raw in_proj_weight
CLIP_CUSTOM = "vpeft-bb-tiny-custom"  # the same block type without extras
CLIP_CUSTOM_TEXT = "vpeft-bb-tiny-customtext"  # CustomTextCLIP: the text tower is a TextTransformer at model.text
#: NormFormer-style custom blocks: per-head scales and a norm inside attention, norms after attention and in the MLP.
#: (open_clip 3.3's scaled-cosine attention is not covered: it calls torch.bmm on 4-d tensors and fails upstream.)
CLIP_NORMFORMER = "vpeft-bb-tiny-normformer"
_VARIANTS = {CLIP: {}, CLIP_QK_NORM: {"qk_norm": True}, CLIP_CUSTOM: {"block_type": "custom"}, CLIP_CUSTOM_TEXT: {},
             CLIP_NORMFORMER: {"scale_heads": True, "scale_attn_inner": True, "scale_attn": True, "scale_fc": True}}
_config_dir: Optional[tempfile.TemporaryDirectory] = None


def clip_config(**block: object) -> dict:
    """Vision: 32x32 images, patch 8, 2 blocks of width 64 with 4 heads. Text: 16 tokens, vocabulary 100, 2 blocks
    of width 64 with 4 heads. Joint embedding 32."""
    return dict(
        embed_dim=32,
        vision_cfg=dict(image_size=32, layers=2, width=WIDTH, patch_size=8, head_width=16, **block),
        text_cfg=dict(context_length=16, vocab_size=100, width=WIDTH, heads=4, layers=2, **block),
    )


def register_clips() -> None:
    """Register the tiny open_clip configs (idempotent)."""
    global _config_dir
    if _config_dir is not None:
        return
    import open_clip

    _config_dir = tempfile.TemporaryDirectory(prefix="vpeft-open-clip-cfg-")
    for name, block in _VARIANTS.items():
        cfg = clip_config(**block)
        if name == CLIP_CUSTOM_TEXT:
            cfg["custom_text"] = True
        with open(f"{_config_dir.name}/{name}.json", "w") as f:
            json.dump(cfg, f)
    open_clip.add_model_config(_config_dir.name)


def make_clip(name: str = CLIP, seed: int = 0, **kwargs) -> nn.Module:
    """A randomly initialised tiny open_clip CLIP built by open_clip itself (not through vpeft)."""
    import open_clip

    register_clips()
    torch.manual_seed(seed)
    return open_clip.create_model(name, **kwargs).eval()


def make_timm(seed: int = 0, arch: str = TIMM_ARCH, **kwargs) -> nn.Module:
    """A randomly initialised tiny timm ViT built by timm itself (not through vpeft)."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(arch, **{**TIMM_KW, **kwargs}).eval()


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def tokens(n: int = 2, seed: int = 2) -> torch.Tensor:
    """Token ids in [1, 98] with the end-of-text id 99 (the largest, where open_clip pools) at varying positions."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, 99, (n, 16), generator=g)
    for i in range(n):
        t[i, 5 + 3 * i:] = 0
        t[i, 4 + 3 * i] = 99
    return t


def randomize_(model: nn.Module, seed: int = 3) -> nn.Module:
    """Give every float tensor random values (so that zero-initialised biases and unit norms are exercised too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.state_dict().values():
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 and p.numel() == WIDTH else 0.0))
    return model
