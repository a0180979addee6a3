"""Adapters on the Triton kernels: with ``use_kernels("torch")`` and ``use_kernels("triton")`` (the interpreter on
CPU) a tiny ViT and a tiny CLIP give the same outputs and the same gradients for every trainable tensor, and the
adapters' repr says which backend ran."""

from __future__ import annotations

import pytest
import torch
from conftest import make_clip, make_timm

import vpeft
from vpeft.kernels import use_kernels

CASES = {
    "lora_qv+ssf": lambda: [vpeft.LoraConfig(r=4, targets=["q", "v"]), vpeft.SSFConfig()],
    "lora_qkv_mlp": lambda: [vpeft.LoraConfig(r=1, targets=["qkv", "mlp_in", "mlp_out"])],
    "dora_qv": lambda: [vpeft.DoRAConfig(r=4, targets=["q", "v"])],
    "block_lora": lambda: [vpeft.BlockLoraConfig(dropout=0.0)],
}


def _randomise(pm) -> None:
    # B = 0 / scale = 1 at initialisation would hide mistakes in the adapter path: make every tensor non-trivial.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad and "magnitude" not in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) * 0.1)


def _run(pm, x, mode):
    with use_kernels(mode):
        out = pm(x)
        (out * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum().backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("case", list(CASES))
def test_vit_torch_and_triton_agree(case):
    pm = vpeft.get_peft_model(make_timm(embed_dim=48, num_heads=2), CASES[case](), trainable_extra=["head"])
    _randomise(pm)
    x = torch.randn(2, 3, 32, 32)
    ref_out, ref_grads = _run(pm, x, "torch")
    assert "kernel=torch" in repr(pm)
    out, grads = _run(pm, x, "triton")
    assert "kernel=triton" in repr(pm) and "kernel=torch" not in repr(pm)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-5, msg=n)


def test_clip_packed_attention_torch_and_triton_agree():
    clip = make_clip()
    pm = vpeft.get_peft_model(clip, vpeft.LoraConfig(r=2, targets=["q", "k", "v"], towers=["visual", "text"]))
    _randomise(pm)
    images, text = torch.randn(2, 3, 32, 32), torch.randint(1, 99, (2, 16))

    def run(mode):
        with use_kernels(mode):
            img, txt = pm.encode_image(images), pm.encode_text(text)
            (img.sum() + (txt * 2).sum()).backward()
        grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
        pm.zero_grad(set_to_none=True)
        return img.detach(), txt.detach(), grads

    ref, got = run("torch"), run("triton")
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], rtol=1e-5, atol=1e-5, msg=n)


def test_forced_triton_refuses_active_dropout():
    pm = vpeft.get_peft_model(make_timm(), vpeft.LoraConfig(r=2, dropout=0.1))
    pm.train()
    with use_kernels("triton"), pytest.raises(RuntimeError, match="dropout on the low-rank branch is active"):
        pm(torch.randn(1, 3, 32, 32))
    pm.eval()  # dropout is the identity in eval mode: the kernel runs
    with use_kernels("triton"):
        pm(torch.randn(1, 3, 32, 32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_vit_on_cuda_auto_picks_triton_and_matches_torch(case):
    """On a GPU, mode ``auto`` runs the compiled kernels (no interpreter) and agrees with the torch path (fp32 with
    TF32 off, the default, so both sides multiply in full precision)."""
    pm = vpeft.get_peft_model(make_timm(embed_dim=48, num_heads=2), CASES[case](), trainable_extra=["head"]).cuda()
    _randomise(pm)
    x = torch.randn(2, 3, 32, 32, device="cuda")
    ref_out, ref_grads = _run(pm, x, "torch")
    out, grads = _run(pm, x, "auto")
    assert "kernel=triton" in repr(pm) and "kernel=torch" not in repr(pm)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-5, msg=n)
