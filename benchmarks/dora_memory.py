"""Bytes that autograd saves for backward in one training forward: vpeft LoRA vs vpeft DoRA vs full fine-tuning,
and HF peft's DoRA when ``peft`` is importable (it is not a vpeft dependency; that row is skipped without it).

Usage::

    python -m benchmarks.dora_memory [--model vit_small_patch16_224] [--batch 2] [--r 8]

The model is a randomly initialised timm ViT (``num_classes=0``) in train mode on CPU. Every tensor autograd
saves passes through ``torch.autograd.graph.saved_tensors_hooks``; the bytes of the distinct storages are added
up, once including and once excluding parameter storages (the latter are resident anyway, so "activations" is
the memory that training adds on top of the weights). Ratios are against full fine-tuning.
"""

from __future__ import annotations

import argparse
import copy
from typing import Callable, Optional

import torch
import torch.nn as nn


def saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(all saved bytes, saved bytes outside parameter storages) of ``model(x)``, distinct storages once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.float().pow(2).mean().backward()  # check that the graph is complete (and trains)
    return sum(seen.values()), sum(n for p, n in seen.items() if p not in params)


def _vpeft(configs) -> Callable[[nn.Module], nn.Module]:
    def build(model: nn.Module) -> nn.Module:
        import vpeft

        return vpeft.get_peft_model(model, configs)

    return build


def _full(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _peft(use_dora: bool, r: int) -> Optional[Callable[[nn.Module], nn.Module]]:
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model
    except ImportError:
        return None

    def build(model: nn.Module) -> nn.Module:
        cfg = PeftLoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=["qkv"], use_dora=use_dora)
        model = inject_adapter_in_model(cfg, model)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
        return model

    return build


def main(argv: Optional[list[str]] = None) -> list[tuple[str, int, int]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--r", type=int, default=8)
    args = ap.parse_args(argv)

    import timm

    import vpeft.backbones.timm_vit  # noqa: F401  (registers the timm spec for models built with timm directly)
    from vpeft import LoraConfig
    from vpeft.methods.dora import DoRAConfig

    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False, num_classes=0).train()
    x = torch.randn(args.batch, 3, *base.pretrained_cfg["input_size"][1:])
    rows: list[tuple[str, Optional[Callable[[nn.Module], nn.Module]]]] = [
        ("full fine-tuning", _full),
        ("vpeft LoRA q,v", _vpeft([LoraConfig(r=args.r)])),
        ("vpeft DoRA q,v", _vpeft([DoRAConfig(r=args.r)])),
        ("vpeft DoRA qkv", _vpeft([DoRAConfig(r=args.r, targets=["qkv"])])),
        ("peft LoRA attn.qkv", _peft(False, args.r)),
        ("peft DoRA attn.qkv", _peft(True, args.r)),
    ]
    print(f"{args.model} (random init, num_classes=0), batch {args.batch}, r={args.r}, train mode, "
          f"torch {torch.__version__}")
    print(f"{'setup':<22}{'saved MB':>10}{'vs full':>9}{'activations MB':>16}{'vs full':>9}")
    results, ref = [], None
    for name, build in rows:
        if build is None:
            print(f"{name:<22}  skipped (peft is not installed)")
            continue
        total, acts = saved_bytes(build(copy.deepcopy(base)), x)
        ref = ref or (total, acts)
        print(f"{name:<22}{total / 2**20:>10.2f}{total / ref[0]:>9.3f}{acts / 2**20:>16.2f}{acts / ref[1]:>9.3f}")
        results.append((name, total, acts))
    return results


if __name__ == "__main__":
    main()
