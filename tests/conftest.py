"""Tiny backbones shared by the test suite (DESIGN section 8): built in fixtures, never downloaded."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
import torch.nn as nn

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Without a GPU the Triton kernels run through Triton's interpreter (DESIGN section 7). Triton reads the switch when a
# kernel is defined, so it is set here, before any test imports vpeft.kernels; torch code paths are unaffected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_CLIP = "vpeft-tiny-ViT"
TINY_CLIP_CFG = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=16),
    text_cfg=dict(context_length=16, vocab_size=100, width=64, heads=4, layers=2),
)


def register_tiny_clip() -> None:
    # open_clip.add_model_config only reads JSON files; the registry dict takes a config directly.
    from open_clip.factory import _MODEL_CONFIGS

    _MODEL_CONFIGS.setdefault(TINY_CLIP, TINY_CLIP_CFG)


def make_timm(seed: int = 0, **kw) -> nn.Module:
    """A depth-2, width-64 timm ViT on 32x32 images (patch 8 -> 16 tokens + class token)."""
    import vpeft

    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5)
    args.update(kw)
    return vpeft.create_backbone("timm:vit_tiny_patch16_224", **args).eval()


def make_clip(seed: int = 0) -> nn.Module:
    """A tiny open_clip CLIP (2-block towers, width 64) registered as ``open_clip:vpeft-tiny-ViT``."""
    import vpeft

    register_tiny_clip()
    torch.manual_seed(seed)
    return vpeft.create_backbone(f"open_clip:{TINY_CLIP}").eval()


@dataclass
class Case:
    """A tiny backbone with its input and the call that produces its output."""

    name: str
    build: Callable[[int], nn.Module]
    make_input: Callable[[], torch.Tensor]
    run: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    towers: Optional[list[str]] = None


def images() -> torch.Tensor:
    """Two 32x32 RGB images, seeded."""
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def tokens() -> torch.Tensor:
    """Two 16-token texts for the tiny CLIP, seeded."""
    g = torch.Generator().manual_seed(2)
    t = torch.randint(1, 98, (2, 16), generator=g)
    t[:, 10] = 99  # "end of text": the highest id, where open_clip pools
    return t


_images, _tokens = images, tokens


#: Placeholder id of learned text context in the tiny CLIP's vocabulary (start-of-text = vocab_size - 2).
TINY_PLACEHOLDER = 98


def _prompt_tokens() -> torch.Tensor:
    t = _tokens()
    t[:, 1:3] = TINY_PLACEHOLDER  # two context positions (the conformance matrix uses n_ctx=2)
    return t


def _prompt_run(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """Image features and, per image, the features of every text row (image-major, as CoCoOp's prompts need)."""
    import contextlib

    import torch.nn.functional as F

    img = m.encode_image(_images())
    cond = m.conditioning(image_features=F.normalize(img, dim=-1)) if hasattr(m, "conditioning") else \
        contextlib.nullcontext()
    with cond:
        txt = m.encode_text(t.repeat(img.shape[0], 1))
    return torch.cat([img, txt])


def make_point(seed: int = 0) -> nn.Module:
    """A depth-2, width-64 Point-MAE transformer (16 groups of 16 points, no drop path)."""
    import vpeft

    torch.manual_seed(seed)
    return vpeft.create_backbone("point_mae:base", num_group=16, group_size=16, embed_dim=64, depth=2, num_heads=4,
                                 num_classes=5, drop_path_rate=0.0).eval()


def clouds() -> torch.Tensor:
    """Two seeded clouds of 256 points."""
    return torch.randn(2, 256, 3, generator=torch.Generator().manual_seed(3))


CASES = {
    "timm_vit": Case("timm_vit", make_timm, _images, lambda m, x: m(x)),
    "clip_visual": Case("clip_visual", make_clip, _images, lambda m, x: m.encode_image(x), ["visual"]),
    "clip_text": Case("clip_text", make_clip, _tokens, lambda m, x: m.encode_text(x), ["text"]),
    # CLIP prompt learning (both towers): text rows with context placeholders, run as ClipClassifier runs them.
    "clip_prompt": Case("clip_prompt", make_clip, _prompt_tokens, _prompt_run),
    # Point clouds: FPS/kNN groups, BatchNorm in the frozen PointNet, a BatchNorm head.
    "point_mae": Case("point_mae", make_point, clouds, lambda m, x: m(x)),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request) -> Case:
    return CASES[request.param]


@pytest.fixture
def tiny_timm() -> nn.Module:
    return make_timm()


@pytest.fixture
def tiny_clip() -> nn.Module:
    return make_clip()


def randomize_adapters(pm, seed: int = 1, std: float = 0.1) -> None:
    """Random values for every trainable tensor (LoRA-style B starts at zero, which would make checks trivial)."""
    pm.eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference relative to the reference's scale."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
