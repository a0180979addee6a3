"""SPT numerics: a budget of N trains exactly N parameters (head reported separately), the allocation follows the
sensitivity ranking and the LoRA threshold, the adapter file holds sparse index/value pairs (never dense deltas), the
forward equals the backbone with ``W + B A`` / ``W + Delta`` written in by hand, merging is exact, and a saved
adapter reloads into a fresh model without data."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_clip, make_timm, rel_err
from safetensors.torch import load_file
from torch.func import functional_call

import vpeft
from vpeft.methods._calibration import calibrate, calibration_tensors
from vpeft.methods.layers import AdapterLayer
from vpeft.methods.spt import SPTConfig, matrix_key, trainable_count


def labelled(n: int = 2):
    g = torch.Generator().manual_seed(4)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]


def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def spt_adapters(pm):
    return {path: a for path, layer in pm.adapter_layers().items() for k, a in layer.adapters() if k == "spt"}


def perturb(pm, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in spt_adapters(pm).values():
            for p in a.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_paper_defaults():
    cfg = SPTConfig()
    assert (cfg.budget, cfg.r, cfg.alpha, cfg.scaling) == (400_000, 8, 10.0, 1.0)
    assert vpeft.get_method("spt").default_targets == ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")


@pytest.mark.parametrize("budget", [37, 1500, 4000])
def test_budget_is_trained_exactly(budget):
    model = make_timm()
    head = sum(p.numel() for p in model.head.parameters())
    (cfg,) = calibrate(model, [SPTConfig(budget=budget, r=2)], labelled())
    pm = vpeft.get_peft_model(model, cfg, trainable_extra=["head"])
    assert pm.num_parameters(trainable_only=True) == budget + head
    assert trainable_count(pm) == budget
    sel = cfg.selection
    # independent count from the selection: r (d_in + d_out) per LoRA matrix plus the sparse counts
    shapes = {}
    for i in range(2):
        for n in "qkv":
            shapes[matrix_key(f"blocks.{i}.attn.qkv", n)] = (64, 64)
        shapes[matrix_key(f"blocks.{i}.attn.proj", "w")] = (64, 64)
        shapes[matrix_key(f"blocks.{i}.mlp.fc1", "w")] = (256, 64)
        shapes[matrix_key(f"blocks.{i}.mlp.fc2", "w")] = (64, 256)
    lora_cost = {k: 2 * sum(shapes[k]) for k in sel["lora"]}
    assert sum(lora_cost.values()) + sum(sel["sparse"].values()) == budget
    if budget == 4000:
        assert sel["lora"], "a large budget should turn some matrices into LoRA"
    if budget == 37:
        assert not sel["lora"]


def test_allocation_follows_sensitivity_and_threshold():
    """Against an independent sensitivity (sum of squared gradients): every sparse position outranks every unselected
    position of a non-LoRA matrix, and each LoRA matrix had at least r (d_in + d_out) / alpha positions among the
    positions ranked above the last one taken."""
    model = make_timm()
    data = labelled()
    r, alpha, budget = 2, 10.0, 3000
    (cfg,) = calibrate(model, [SPTConfig(budget=budget, r=r, alpha=alpha)], data)
    ref = copy.deepcopy(model).eval()
    mats = {}
    for i in range(2):
        w = ref.blocks[i].attn.qkv.weight
        for j, n in enumerate("qkv"):
            mats[matrix_key(f"blocks.{i}.attn.qkv", n)] = (w, slice(64 * j, 64 * (j + 1)))
        for mod in ("attn.proj", "mlp.fc1", "mlp.fc2"):
            mats[matrix_key(f"blocks.{i}.{mod}", "w")] = (ref.get_submodule(f"blocks.{i}.{mod}").weight, slice(None))
    ws = list({id(w): w for w, _ in mats.values()}.values())
    sens = [torch.zeros_like(w) for w in ws]
    for x, y in data:
        for s, g in zip(sens, torch.autograd.grad(F.cross_entropy(ref(x), y), ws)):
            s += g.square()
    by_id = {id(w): s for w, s in zip(ws, sens)}
    s_of = {k: by_id[id(w)][rows].flatten() for k, (w, rows) in mats.items()}
    tensors = calibration_tensors(cfg)
    taken_min = min(float(s_of[k][tensors[f"sparse_index:{k}"]].min()) for k in cfg.selection["sparse"])
    for k, s in s_of.items():
        if k in cfg.selection["lora"]:
            continue
        keep = torch.zeros(s.numel(), dtype=torch.bool)
        if k in cfg.selection["sparse"]:
            keep[tensors[f"sparse_index:{k}"]] = True
        if (~keep).any():
            assert float(s[~keep].max()) <= taken_min, k
    all_s = torch.cat(list(s_of.values()))
    above = {k: int((s >= taken_min).sum()) for k, s in s_of.items()}
    for k in cfg.selection["lora"]:
        w, rows = mats[k]
        h = w[rows].shape[0]
        assert above[k] >= r * (h + w.shape[1]) / alpha, k
    assert all_s.numel() == sum(v.numel() for v in s_of.values())


def test_forward_matches_hand_written_weights_and_merge_is_exact():
    model = make_timm()
    (cfg,) = calibrate(model, [SPTConfig(budget=3000, r=2)], labelled())
    assert cfg.selection["lora"] and cfg.selection["sparse"]
    ref = copy.deepcopy(model).requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = vpeft.get_peft_model(model, cfg)
    perturb(pm)
    x = images()
    with torch.no_grad():
        y = pm(x)
    # expectation: W + scaling * B A on LoRA slices, W + Delta at the sparse positions, in a plain copy
    params = {n: p.detach().clone() for n, p in ref.named_parameters()}
    tensors = calibration_tensors(cfg)
    for path, a in spt_adapters(pm).items():
        w = params[f"{path}.weight"]
        for n, (lo, hi) in a.lora_slices.items():
            w[lo:hi] += a.lora_B[n].detach() @ a.lora_A[n].detach()
        if a.sparse_value is not None:
            for key in cfg.selection["sparse"]:
                kpath, sl = key.split(":")
                if kpath != path:
                    continue
                lo = 0 if sl == "w" else "qkv".index(sl) * 64
                idx = tensors[f"sparse_index:{key}"]
                rows, cols = idx // w.shape[1] + lo, idx % w.shape[1]
                pos = (rows * w.shape[1] + cols)
                vals = a.sparse_value.detach()[torch.searchsorted(a.sparse_index, pos)]
                w[rows, cols] += vals
    with torch.no_grad():
        exp = functional_call(ref, params, (x,))
    torch.testing.assert_close(y, exp, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        pm.merge()
        assert rel_err(pm(x), y) < 1e-5
        pm.unmerge()
        assert rel_err(pm(x), y) < 1e-5
    restored = pm.unload().state_dict()
    for k, v in restored.items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6, msg=k)


def test_sparse_only_unmerge_is_bit_exact():
    model = make_timm()
    (cfg,) = calibrate(model, [SPTConfig(budget=40, r=2)], labelled())
    assert not cfg.selection["lora"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = vpeft.get_peft_model(model, cfg)
    perturb(pm)
    with torch.no_grad():
        pm.merge()
        pm.unmerge()
    for k, v in pm.unload().state_dict().items():
        assert torch.equal(v, before[k]), k


def test_adapter_file_is_sparse_and_reloads_without_data(tmp_path):
    model = make_timm()
    (cfg,) = calibrate(model, [SPTConfig(budget=3000, r=2)], labelled())
    pm = vpeft.get_peft_model(model, cfg, trainable_extra=["head"])
    perturb(pm)
    x = images()
    with torch.no_grad():
        y = pm(x)
    pm.save_adapter(str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    meta = json.loads((tmp_path / "vpeft_config.json").read_text())
    sel = meta["methods"][0]["selection"]
    assert sel == cfg.selection
    per_module: dict[str, int] = {}
    for key, count in sel["sparse"].items():
        per_module[key.split(":")[0]] = per_module.get(key.split(":")[0], 0) + count
    for path, count in per_module.items():
        idx, val = saved[f"{path}.spt.sparse_index"], saved[f"{path}.spt.sparse_value"]
        assert idx.dtype == torch.int64 and idx.shape == (count,) and val.shape == (count,)
    n_sparse = sum(1 for k in saved if k.endswith("sparse_value"))
    assert n_sparse == len(per_module)
    # nothing weight-sized except LoRA factors and the head: no dense delta
    for k, t in saved.items():
        if ".spt." in k:
            assert "lora_" in k or t.dim() == 1, k
    fresh = make_timm(seed=0)
    pm2 = vpeft.PeftModel.from_pretrained(fresh, str(tmp_path))
    with torch.no_grad():
        assert torch.equal(pm2(x), y)
    # the placeholder positions of the rebuilt adapter were replaced by the saved ones
    for path, a in spt_adapters(pm2).items():
        if a.sparse_value is not None:
            assert torch.equal(a.sparse_index, spt_adapters(pm)[path].sparse_index)


def test_open_clip_towers_and_packed_slices():
    clip = make_clip()
    text = torch.randint(1, 98, (2, 16), generator=torch.Generator().manual_seed(2))
    text[:, 10] = 99

    def loss(m, batch, _):
        img, txt = batch
        return m.encode_image(img).square().mean() + m.encode_text(txt).square().mean()

    (cfg,) = calibrate(clip, [SPTConfig(budget=2500, r=2, towers=["visual", "text"])], [((images(), text), None)],
                       loss_fn=loss)
    keys = list(cfg.selection["lora"]) + list(cfg.selection["sparse"])
    assert any(k.startswith("visual.") for k in keys) and any(k.startswith("transformer.") for k in keys)
    pm = vpeft.get_peft_model(clip, cfg)
    assert trainable_count(pm) == pm.num_parameters(True) == 2500
    perturb(pm)
    with torch.no_grad():
        y = loss(pm, (images(), text), None)
        pm.merge()
        torch.testing.assert_close(loss(pm, (images(), text), None), y, rtol=1e-5, atol=1e-6)


def test_bad_configs_refused_before_mutation():
    model = make_timm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = {"lora": [], "sparse": {matrix_key("blocks.0.attn.qkv", "q"): 3}}
    bad = [
        (SPTConfig(budget=-3, selection=good), "budget"),
        (SPTConfig(budget=1.5, selection=good), "budget"),
        (SPTConfig(r=0, selection=good), "r must"),
        (SPTConfig(alpha=0.5, selection=good), "alpha"),
        (SPTConfig(selection={"lora": [], "sparse": {}}), "selection"),
        (SPTConfig(selection={"lora": ["blocks.0.attn.qkv:z"], "sparse": {}}), "not among"),
        (SPTConfig(selection={"lora": [], "sparse": {"blocks.0.attn.proj:w": 10 ** 6}}), "has 4096 weights"),
        (SPTConfig(selection={"lora": ["blocks.0.attn.proj:w"], "sparse": {"blocks.0.attn.proj:w": 2}}), "both"),
        (SPTConfig(), "vpeft.calibrate"),
    ]
    for cfg, msg in bad:
        with pytest.raises((ValueError, TypeError), match=msg):
            vpeft.get_peft_model(model, [vpeft.LoraConfig(r=2), cfg])
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # an explicit selection without calibration tensors builds (placeholder positions of the recorded sizes)
    pm = vpeft.get_peft_model(model, SPTConfig(selection=good))
    (a,) = spt_adapters(pm).values()
    assert type(a).__name__ == "SPTAdapter" and a.sparse_index.tolist() == [0, 1, 2]
    assert math.isclose(trainable_count(pm), 3)
