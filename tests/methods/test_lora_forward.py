"""LoRA's forward (one fused addmm per adapted slice) against the formula written out on the fused qkv Linear:
``qkv(x) + scaling * (x A_s^T) B_s^T`` added into slice ``s`` only, in float64."""

from __future__ import annotations

import pytest
import torch

import vpeft

SLICES = {"q": (0, 32), "k": (32, 64), "v": (64, 96)}


@pytest.mark.parametrize("targets", [["q", "v"], ["k"], ["q", "k", "v"], ["qkv"]])
def test_lora_forward_matches_the_formula(targets):
    torch.manual_seed(0)
    model = vpeft.create_backbone("timm:vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=1,
                                  num_heads=2, num_classes=3).double().eval()
    qkv = model.blocks[0].attn.qkv
    w, b = qkv.weight.detach().clone(), qkv.bias.detach().clone()
    pm = vpeft.get_peft_model(model, vpeft.LoraConfig(r=2, alpha=3, targets=targets))
    layer = pm.base_model.blocks[0].attn.qkv
    adapter = layer.adapters()[0][1]
    with torch.no_grad():
        for p in adapter.lora_B.values():
            p.normal_()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    expected = x @ w.t() + b
    for name, (lo, hi) in ({"qkv": (0, 96)} if targets == ["qkv"] else SLICES).items():
        key = "w" if targets == ["qkv"] else name
        if key in adapter.lora_A:
            a_, b_ = adapter.lora_A[key].detach(), adapter.lora_B[key].detach()
            expected[..., lo:hi] += 1.5 * (x @ a_.t()) @ b_.t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
