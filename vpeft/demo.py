"""``vpeft demo``: a short offline run of the whole adapter life cycle on real data (scikit-learn's digits).

1. A tiny timm ViT is *self-pretrained* on digits 0-4 (no pretrained vision weights can be downloaded here; the
   result is labelled self-pretrained everywhere) and saved as a timm-format safetensors checkpoint.
2. For digits 5-9, a few labelled images per class train a new head with several PEFT methods, each starting
   from that checkpoint loaded back through ``vpeft.create_backbone(..., pretrained=path)``.
3. The LoRA adapter is saved, reloaded into a fresh backbone (identical predictions) and merged (identical
   predictions, plain timm module).

Numbers are what this run measures; on this tiny data a method may well not beat the linear probe.
The full few-shot quickstart on Fashion-MNIST is ``vpeft quickstart`` (training issue).
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F

import vpeft

BACKBONE = "timm:vit_tiny_patch16_224"
ARCH = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=4, num_heads=4)


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits as (N, 1, 8, 8) floats in [0, 1] and labels."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as e:  # pragma: no cover - the README's set-up installs it
        raise SystemExit("vpeft demo needs scikit-learn (pip install 'vpeft[demo]')") from e
    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return (x - 0.5) / 0.5, torch.tensor(d.target)


def _train(model, params, x, y, steps: int, lr: float, batch: int = 64, seed: int = 0) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(batch, len(x)),), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    return (model(x).argmax(-1) == y).float().mean().item()


def _load(ckpt: str):
    """The self-pretrained backbone through the real loader; its config says the file holds 1-channel weights."""
    return vpeft.create_backbone(BACKBONE, pretrained=ckpt, num_classes=5,
                                 pretrained_cfg_overlay=dict(input_size=(1, 8, 8)), **ARCH)


def run(out_dir: str = "out/demo", shots: int = 10, seed: int = 0) -> dict:
    """Run the demo; write ``results.json`` and the LoRA adapter under ``out_dir``; return the results."""
    torch.manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    x, y = load_digits()
    src, tgt = y < 5, y >= 5

    # 1. self-pretraining on digits 0-4
    t0 = time.time()
    net = vpeft.create_backbone(BACKBONE, num_classes=5, **ARCH)
    _train(net, net.parameters(), x[src], y[src], steps=300, lr=2e-3, seed=seed)
    ckpt = os.path.join(out_dir, "self_pretrained_vit.safetensors")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, ckpt)
    print(f"self-pretrained tiny ViT on digits 0-4 in {time.time() - t0:.1f}s "
          f"(source accuracy {_accuracy(net, x[src], y[src]):.3f}); saved {ckpt}")

    # 2. few-shot transfer to digits 5-9
    g = torch.Generator().manual_seed(seed)
    xt, yt = x[tgt], y[tgt] - 5
    train_idx = torch.cat([torch.nonzero(yt == c).flatten()[torch.randperm(int((yt == c).sum()), generator=g)[:shots]]
                           for c in range(5)])
    test_mask = torch.ones(len(yt), dtype=torch.bool)
    test_mask[train_idx] = False
    methods = {
        "linear probe": [],
        "lora (r=4, q,v)": [vpeft.LoraConfig(r=4)],
        "ssf": [vpeft.SSFConfig()],
        "vpt-deep (5 tokens)": [vpeft.VPTConfig(num_tokens=5)],
        "bitfit": [vpeft.BitFitConfig()],
    }
    rows = {}
    pms = {}
    for name, cfgs in methods.items():
        torch.manual_seed(seed)
        model = _load(ckpt)
        pm = vpeft.get_peft_model(model, cfgs, trainable_extra=["head"])
        t = time.time()
        _train(pm, [p for p in pm.parameters() if p.requires_grad], xt[train_idx], yt[train_idx], 150, 5e-3, seed=seed)
        rows[name] = dict(accuracy=_accuracy(pm, xt[test_mask], yt[test_mask]),
                          trainable_params=pm.num_parameters(True), train_seconds=round(time.time() - t, 2))
        pms[name] = pm
    print(f"\n{shots}-shot transfer to digits 5-9 (self-pretrained backbone, {int(test_mask.sum())} test images)")
    print(f"{'method':<22}{'accuracy':>10}{'trainable':>12}{'train s':>9}")
    for name, r in rows.items():
        print(f"{name:<22}{r['accuracy']:>10.3f}{r['trainable_params']:>12,}{r['train_seconds']:>9.2f}")

    # 3. adapter life cycle: save, reload into a fresh backbone, merge
    pm = pms["lora (r=4, q,v)"]
    adir = os.path.join(out_dir, "lora_adapter")
    pm.save_adapter(adir)
    fresh = _load(ckpt)
    pm2 = vpeft.PeftModel.from_pretrained(fresh, adir)
    xtest = xt[test_mask]
    with torch.no_grad():
        same = torch.equal(pm2(xtest), pm(xtest))
        y_unmerged = pm(xtest)
        merged = pm.merge_and_unload()
        merge_err = ((merged(xtest) - y_unmerged).abs().max() / y_unmerged.abs().max()).item()
    size = os.path.getsize(os.path.join(adir, "adapter_model.safetensors"))
    print(f"\nLoRA adapter saved to {adir} ({size:,} bytes); reloaded outputs identical: {same}; "
          f"merged vs unmerged max relative difference: {merge_err:.2e}; merged model type: {type(merged).__name__}")
    results = dict(backbone=f"{BACKBONE} {ARCH} (self-pretrained on digits 0-4)", shots=shots, seed=seed,
                   methods=rows, reload_identical=same, merge_rel_err=merge_err)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"results written to {os.path.join(out_dir, 'results.json')}")
    return results
