"""Shared pieces of the CLIP task tests: a tiny CLIP with CLIP's BPE vocabulary and a learnable fake dataset."""

from __future__ import annotations

TINY_BPE = "vpeft-tiny-bpe"
BACKBONE = f"open_clip:{TINY_BPE}"
TINY_BPE_CFG = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=16),
                    text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=4, layers=2))
#: Real words (CLIP's BPE has them), one colour per class in the fake images.
CLASSES = ("airplane", "bonsai", "cougar", "dolphin", "elephant", "ferry")


def register_tiny_bpe_clip() -> str:
    """Register the tiny BPE CLIP config with open_clip (idempotent); returns its backbone id."""
    from open_clip.factory import _MODEL_CONFIGS

    _MODEL_CONFIGS.setdefault(TINY_BPE, TINY_BPE_CFG)
    return BACKBONE


def tokenizer():
    """CLIP's BPE tokenizer at the tiny model's context length."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=32)


def make_clip_coop_root(root, per_class: tuple[int, int, int] = (8, 4, 6)) -> str:
    """A fake Caltech101 (CoOp layout) with :data:`CLASSES`, 32x32 images of one colour per class plus noise."""
    from fake_coop import make_fake_coop

    make_fake_coop(root, "caltech101", classes=CLASSES, per_class=per_class, size=32)
    return str(root)
