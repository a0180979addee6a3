"""Point-PEFT numerics on a tiny Point-MAE transformer: the forward against a hand-written reference of the formulas
(memory-bank enhanced prompts, geometry-aware adapter over spatial kNN of the group centres), the memory bank (plain
prompts before it is built, its features, save and reload without data), parameter counts against the formula, and
refusal of non-point backbones and bad configs before any mutation."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import vpeft
import vpeft.backbones.point_mae  # noqa: F401  (registers point_mae until vpeft.backbones imports it)
from vpeft.backbones.point_mae import PointTransformer
from vpeft.methods.layers import AdapterLayer
from vpeft.methods.point_peft import PointPEFTConfig, build_memory_bank, point_peft_num_parameters

TINY = dict(num_group=16, group_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=5, drop_path_rate=0.0)


def tiny(seed: int = 0, **kw) -> PointTransformer:
    torch.manual_seed(seed)
    return PointTransformer(**{**TINY, **kw}).eval()


def clouds(b: int = 2, n: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, n, 3, generator=torch.Generator().manual_seed(seed))


def randomize(pm, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def build(cfg=None, seed: int = 0):
    pm = vpeft.get_peft_model(tiny(seed), cfg or PointPEFTConfig(k=4, top_k=3))
    randomize(pm)
    return pm


# --- plain reference --------------------------------------------------------------------------------------------------


def enhance_ref(p, mem, top_k):
    """Each prompt row plus the softmax-weighted (over its top_k cosine similarities) sum of bank rows."""
    out = p.clone()
    for t in range(p.shape[0]):
        sims = torch.stack([torch.dot(p[t], m) / (p[t].norm() * m.norm()) for m in mem])
        order = torch.argsort(sims, descending=True)[:top_k]
        w = torch.exp(sims[order]) / torch.exp(sims[order]).sum()
        out[t] = p[t] + (w[:, None] * mem[order]).sum(0)
    return out


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def point_peft_ref(model, x, sd, k, top_k, mem=None):
    tokens, pos = model.prepare_tokens(x)
    center = model.group_divider(x)[1]
    b, g = center.shape[:2]
    for i, blk in enumerate(model.blocks):
        pre = f"blocks.{i}.point_peft"
        p = sd[f"{pre}.prompt"]
        if mem is not None:
            p = enhance_ref(p, mem, top_k)
        h_in = tokens + pos
        y = blk(torch.cat([h_in[:, :1], p.expand(b, -1, -1), h_in[:, 1:]], dim=1))
        y = torch.cat([y[:, :1], y[:, 1 + p.shape[0]:]], dim=1)
        h = y @ sd[f"{pre}.down.weight"].t() + sd[f"{pre}.down.bias"]
        z = h.clone()
        for bi in range(b):
            for gi in range(g):
                d = ((center[bi] - center[bi, gi]) ** 2).sum(-1)
                nb = torch.argsort(d, stable=True)[:k]
                z[bi, 1 + gi] = h[bi, 1 + gi] + h[bi, 1 + nb].amax(0) + h[bi, 1 + nb].mean(0)
        tokens = y + quick_gelu(z) @ sd[f"{pre}.up.weight"].t() + sd[f"{pre}.up.bias"]
    t = F.layer_norm(tokens, (tokens.shape[-1],), model.norm.weight, model.norm.bias, 1e-5)
    return model.head(torch.cat([t[:, 0], t[:, 1:].amax(1)], dim=-1))


# --- tests ----------------------------------------------------------------------------------------------------------


def test_forward_without_bank_uses_plain_prompts(caplog):
    pm, x = build(), clouds()
    sd = {k: v.clone() for k, v in pm.adapter_state_dict().items()}
    assert "_shared.point_peft.memory" not in sd and not bool(sd["_shared.point_peft.built"])
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        y = pm(x)
        ref = point_peft_ref(tiny(), x, sd, k=4, top_k=3)
    assert "memory bank is not built" in caplog.text
    assert rel_err(y, ref) < 1e-4
    with torch.no_grad(), pm.disabled():
        assert torch.equal(pm(x), tiny()(x))


def test_memory_bank_features_enhanced_forward_and_reload(tmp_path):
    pm = build()
    train = [(clouds(seed=10), torch.zeros(2)), (clouds(b=3, seed=11), torch.zeros(3))]
    assert build_memory_bank(pm, train) == 5
    assert pm.configs[0].bank_size == 5
    mem = pm.adapter_state_dict()["_shared.point_peft.memory"]
    # bank rows: max over the patch tokens of the frozen backbone's normalised tokens
    base = tiny()
    with torch.no_grad():
        want = torch.cat([base.forward_features(b[0])[:, 1:].amax(1) for b in train])
    assert mem.shape == (5, 64) and rel_err(mem, want) < 1e-6
    x = clouds(seed=4)
    sd = {k: v.clone() for k, v in pm.adapter_state_dict().items()}
    with torch.no_grad():
        y = pm(x)
        ref = point_peft_ref(tiny(), x, sd, k=4, top_k=3, mem=mem)
        plain = point_peft_ref(tiny(), x, sd, k=4, top_k=3)
    assert rel_err(y, ref) < 1e-4 and rel_err(y, plain) > 1e-3
    pm.save_adapter(str(tmp_path))
    pm2 = vpeft.PeftModel.from_pretrained(tiny(), str(tmp_path))  # no data needed
    assert pm2.configs[0].bank_size == 5
    with torch.no_grad():
        assert torch.equal(pm2(x), y)
    assert torch.equal(pm2.adapter_state_dict()["_shared.point_peft.memory"], mem)


def test_build_memory_bank_refusals():
    pm = build()
    with pytest.raises(ValueError, match="no data"):
        build_memory_bank(pm, [])
    with pytest.raises(ValueError, match="no Point-PEFT method"):
        build_memory_bank(pm, [clouds()], key="lora")


def test_parameter_count_formula():
    pm = vpeft.get_peft_model(tiny(), PointPEFTConfig())
    assert pm.num_parameters(trainable_only=True) == point_peft_num_parameters(64, 2) == 2 * (1024 + 2048 + 16 + 64)
    pm = vpeft.get_peft_model(tiny(), PointPEFTConfig(layers=[1], num_tokens=3, adapter_dim=8))
    assert pm.num_parameters(trainable_only=True) == point_peft_num_parameters(64, 1, 3, 8)


def test_full_size_parameter_count():
    model = PointTransformer().to("meta")  # Point-MAE base: width 384, depth 12, 40 classes
    pm = vpeft.get_peft_model(model, PointPEFTConfig())
    assert pm.num_parameters(trainable_only=True) == point_peft_num_parameters(384, 12) == 225_984
    pm = vpeft.get_peft_model(pm.unload(), PointPEFTConfig(), trainable_extra=["head"])
    assert pm.num_parameters(trainable_only=True) == 225_984 + 273_960


def _assert_untouched(model, before):
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


def test_refuses_non_point_backbones():
    from conftest import make_timm

    model = make_timm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="point-cloud"):
        vpeft.get_peft_model(model, PointPEFTConfig())
    _assert_untouched(model, before)


@pytest.mark.parametrize("kw, match", [
    (dict(num_tokens=0), "num_tokens"),
    (dict(adapter_dim=0), "adapter_dim"),
    (dict(k=0), "k"),
    (dict(top_k=0), "top_k"),
    (dict(bank_size=-1), "bank_size"),
    (dict(prompt_dropout=1.0), "prompt_dropout"),
    (dict(targets=["q"]), "targets"),
    (dict(layers=[2]), "out of range"),
])
def test_bad_configs_refused_before_mutation(kw, match):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        vpeft.get_peft_model(model, PointPEFTConfig(**kw))
    _assert_untouched(model, before)


@pytest.mark.parametrize("order", ["point_peft-first", "idpt-first"])
def test_stacks_with_other_token_methods(order):
    from vpeft.methods.idpt import IDPTConfig

    cfgs = [PointPEFTConfig(k=4, num_tokens=2), IDPTConfig(k=4)]
    if order == "idpt-first":
        cfgs = cfgs[::-1]
    pm = vpeft.get_peft_model(tiny(), cfgs)
    x = clouds()
    with torch.no_grad():
        assert pm(x).shape == (2, 5)
        with pm.disabled():
            assert torch.equal(pm(x), tiny()(x))
