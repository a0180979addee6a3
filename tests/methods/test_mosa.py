"""MoSA: split masks (disjoint, covering, balanced, deterministically seeded, rebuilt on load), sparse training (only
the drawn sparse adapter receives gradients, also under gradient checkpointing), the merged dense adapter (the
average of the sparse adapters; a hand-written forward; exported into AdaptFormer bit for bit at exactly
AdaptFormer's FLOPs), parameter counts, bad configs refused before any change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import images, make_clip, make_timm, rel_err, tokens
from torch.utils.flop_counter import FlopCounterMode

import vpeft
from vpeft.methods.adaptformer import AdaptFormerConfig, BottleneckAdapter
from vpeft.methods.layers import AdapterLayer
from vpeft.methods.mosa import MoSAAdapter, MoSAConfig, consistency_loss, merge_to_adaptformer

BACKBONES = {
    "timm": (make_timm, lambda m, x: m(x), None, images),
    "clip_visual": (make_clip, lambda m, x: m.encode_image(x), ["visual"], images),
    "clip_text": (make_clip, lambda m, x: m.encode_text(x), ["text"], tokens),
}


def randomize(pm: vpeft.PeftModel, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def mosa_adapters(pm: vpeft.PeftModel) -> dict[str, MoSAAdapter]:
    return {path: a for path, layer in pm.adapter_layers().items() for k, a in layer.adapters() if k == "mosa"}


def build(factory=make_timm, **kw) -> vpeft.PeftModel:
    kw.setdefault("dropout", 0.0)
    kw.setdefault("bottleneck", 8)
    return vpeft.get_peft_model(factory(0), MoSAConfig(**kw))


# --- split ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4])
def test_masks_disjoint_covering_balanced(n):
    pm = build(num_experts=n, split="both", split_bias=True)
    for a in mosa_adapters(pm).values():
        assert a.split_tensors == ("down.weight", "down.bias", "up.weight", "up.bias")
        for name in a.split_tensors:
            masks = torch.stack(a.expert_masks(name))
            numel = a.get_parameter(name).numel()
            assert masks.shape == (n, *a.get_parameter(name).shape) and masks.dtype == torch.bool
            assert torch.equal(masks.sum(0), torch.ones_like(masks[0], dtype=torch.long)), "disjoint and covering"
            sizes = masks.flatten(1).sum(1)
            assert set(sizes.tolist()) <= {numel // n, -(-numel // n)} and int(sizes.sum()) == numel
    default = mosa_adapters(build())["blocks.0.mlp"]
    assert default.split_tensors == ("up.weight",), "hierarchical default: dense shared down-projection"


def test_masks_seeded_per_site_and_independent_of_global_rng():
    torch.manual_seed(123)
    a = mosa_adapters(build())
    torch.manual_seed(456)
    b = mosa_adapters(build())
    c = mosa_adapters(build(seed=1))
    ia = {p: x.up_weight_expert for p, x in a.items()}
    assert all(torch.equal(ia[p], b[p].up_weight_expert) for p in ia)
    assert not any(torch.equal(ia[p], c[p].up_weight_expert) for p in ia)
    assert not torch.equal(ia["blocks.0.mlp"], ia["blocks.1.mlp"]), "each site gets its own masks"


def test_masks_are_not_saved_and_rebuild_on_load(tmp_path):
    pm = build()
    randomize(pm)
    assert not any("expert" in k for k in pm.adapter_state_dict())
    pm.save_adapter(str(tmp_path))
    pm2 = vpeft.PeftModel.from_pretrained(make_timm(0), str(tmp_path))
    for p, a in mosa_adapters(pm).items():
        assert torch.equal(a.up_weight_expert, mosa_adapters(pm2)[p].up_weight_expert)
    x = images()
    pm.train(), pm2.train()
    outs = []
    for m in (pm, pm2):
        torch.manual_seed(7)
        with torch.no_grad():
            outs.append(m(x))
    assert torch.equal(*outs), "same seed, same masks: the same sparse training forward after reload"


# --- sparse training --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["up", "both"])
def test_training_updates_only_the_drawn_sparse_adapter(split):
    pm = build(split=split)
    randomize(pm)
    pm.train()
    torch.manual_seed(0)
    pm(images()).square().mean().backward()
    for path, a in mosa_adapters(pm).items():
        drawn = a.last_experts
        assert sorted(drawn) == (["up"] if split == "up" else ["down", "up"])
        for proj in ("down", "up"):
            g = a.get_parameter(f"{proj}.weight").grad
            if proj in drawn:
                mask = a.expert_masks(f"{proj}.weight")[drawn[proj]]
                assert torch.count_nonzero(g[~mask]) == 0, f"{path} {proj}: gradient outside the drawn part"
                assert torch.count_nonzero(g[mask]) > 0
            else:  # more entries than any single part holds (some rows stay zero: bottleneck units dead after ReLU)
                assert torch.count_nonzero(g) > -(-g.numel() // a.num_experts), "the shared dense projection trains"
        assert torch.count_nonzero(a.up.bias.grad) == a.up.bias.numel(), "biases are not split by default"


def test_training_forward_matches_handwritten_sparse_adapter():
    pm = build(split="both")
    randomize(pm)
    pm.train()
    a = mosa_adapters(pm)["blocks.1.mlp"]
    h = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(5))
    for i, j in [(0, 3), (2, 1)]:
        md, mu = a.expert_masks("down.weight")[i], a.expert_masks("up.weight")[j]
        ref = 0.1 * (torch.relu(h @ (a.down.weight * md).T + a.down.bias) @ (a.up.weight * mu).T + a.up.bias)
        with torch.no_grad():
            assert rel_err(a.branch(h, experts={"down": i, "up": j}), ref) < 1e-6
    with pytest.raises(ValueError, match="experts"):
        a.branch(h, experts=4)
    with pytest.raises(ValueError, match="experts"):
        a.branch(h, experts={"up": 0})


def test_draws_vary_per_forward_and_per_site():
    pm = build()
    pm.train()
    seen: dict[str, list[int]] = {p: [] for p in mosa_adapters(pm)}
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(40):
            pm(images())
            for p, a in mosa_adapters(pm).items():
                seen[p].append(a.last_experts["up"])
    for draws in seen.values():
        assert set(draws) == {0, 1, 2, 3}
    assert seen["blocks.0.mlp"] != seen["blocks.1.mlp"], "sites draw independently"


@pytest.mark.parametrize("rng_after", ["none", "dropout", "drop_path"])
def test_gradient_checkpointing_recomputes_with_the_same_sparse_adapter(rng_after):
    """Also with random ops after the draw (the branch's dropout, the block's drop path): a recomputation must
    consume the RNG as the forward did, or their masks would differ."""
    if rng_after == "drop_path":
        pm = build(lambda seed: make_timm(seed, drop_path_rate=0.3))
    else:
        pm = build(dropout=0.3 if rng_after == "dropout" else 0.0)
    randomize(pm)
    pm.train()

    def grads(ckpt: bool):
        pm.set_grad_checkpointing(ckpt)
        pm.zero_grad()
        torch.manual_seed(11)
        pm(images()).square().mean().backward()
        return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    g0, g1 = grads(False), grads(True)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)
    for a in mosa_adapters(pm).values():  # the last (checkpointed) run's gradients sit on the part drawn in its forward
        mask = a.expert_masks("up.weight")[a.last_experts["up"]]
        assert torch.count_nonzero(a.up.weight.grad[~mask]) == 0


# --- merge ------------------------------------------------------------------------------------------------------------


def test_eval_adapter_is_the_average_of_the_sparse_adapters():
    pm = build()
    randomize(pm)
    pm.eval()
    a = mosa_adapters(pm)["blocks.0.mlp"]
    h = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        mean = torch.stack([a.branch(h, experts=i) for i in range(4)]).mean(0)
        assert rel_err(a.branch(h), mean) < 1e-6
    merged = a.merged_state()
    union = sum(a.up.weight * m for m in a.expert_masks("up.weight"))
    assert torch.equal(union, a.up.weight) and torch.allclose(merged["up.weight"], union / 4)
    assert torch.equal(merged["down.weight"], a.down.weight) and torch.equal(merged["up.bias"], a.up.bias)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_eval_forward_matches_handwritten_merged_adapter(name):
    factory, run, towers, make_x = BACKBONES[name]
    pm = build(factory, towers=towers)
    randomize(pm)
    pm.eval()
    ref_model = factory(0).requires_grad_(False)
    for path, a in mosa_adapters(pm).items():
        wd, bd, wu, bu = (t.detach().clone() for t in (a.down.weight, a.down.bias, a.up.weight, a.up.bias))

        def hook(module, inputs, output, wd=wd, bd=bd, wu=wu, bu=bu):
            return output + 0.1 * (torch.relu(inputs[0] @ wd.T + bd) @ (wu / 4).T + bu)

        ref_model.get_submodule(path).register_forward_hook(hook)
    x = make_x()
    with torch.no_grad():
        assert rel_err(run(pm, x), run(ref_model, x)) < 1e-5


def test_merged_inference_costs_exactly_one_dense_adapter():
    x = images()
    base = make_timm(0)
    mosa = vpeft.get_peft_model(make_timm(0), MoSAConfig(bottleneck=8), trainable_extra=["head"])
    randomize(mosa)
    mosa.eval()
    cfg, tensors = merge_to_adaptformer(mosa)
    assert cfg == AdaptFormerConfig(bottleneck=8, scale=0.1, dropout=0.1, activation="relu")
    dense = vpeft.get_peft_model(make_timm(0), cfg, trainable_extra=["head"])
    dense.load_adapter_state_dict(tensors)
    dense.eval()

    def flops(m):
        with FlopCounterMode(display=False) as f, torch.no_grad():
            y = m(x)
        return f.get_total_flops(), y

    (f_base, _), (f_mosa, y_mosa), (f_dense, y_dense) = flops(base), flops(mosa), flops(dense)
    assert f_mosa == f_dense
    tokens, d, r, blocks = x.shape[0] * 17, 64, 8, 2
    assert f_mosa - f_base == blocks * 2 * (2 * tokens * d * r), "one down- and one up-projection per block"
    assert torch.equal(y_mosa, y_dense), "the exported AdaptFormer adapter is MoSA's merged adapter, bit for bit"
    a = mosa_adapters(mosa)["blocks.1.mlp"]
    single = a.merged_adapter()
    assert type(single) is BottleneckAdapter and not single.training
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(single.branch(h), a.branch(h))


def test_merge_into_backbone_refused_and_export_needs_mosa():
    pm = build()
    with pytest.raises(ValueError, match="not mergeable"):
        pm.merge()
    with pytest.raises(ValueError, match="exactly one MoSA"):
        merge_to_adaptformer(vpeft.get_peft_model(make_timm(0), AdaptFormerConfig(bottleneck=4)))


# --- parameters, configs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 4, 8])
def test_parameter_count_is_one_adapter(n):
    d, r = 64, 8
    mosa = build(num_experts=n, split="both", split_bias=True)
    dense = vpeft.get_peft_model(make_timm(0), AdaptFormerConfig(bottleneck=r))
    assert mosa.num_parameters(True) == dense.num_parameters(True) == 2 * (d * r + r + r * d + d)


@pytest.mark.parametrize("bad, exc", [
    (dict(num_experts=0), ValueError), (dict(num_experts=True), ValueError), (dict(split="left"), ValueError),
    (dict(split_bias="yes"), TypeError), (dict(seed=-1), ValueError), (dict(bottleneck=0), ValueError),
    (dict(targets=["q"]), ValueError),
    # 16 sparse adapters cannot share the 2 entries of the down-projection bias
    (dict(num_experts=16, bottleneck=2, split="down", split_bias=True), ValueError),
])
def test_bad_config_refused_before_mutation(bad, exc):
    model = make_timm(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc):
        vpeft.get_peft_model(model, MoSAConfig(**bad))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_config_roundtrip_and_defaults():
    cfg = MoSAConfig()
    assert (cfg.num_experts, cfg.split, cfg.split_bias, cfg.bottleneck, cfg.scale) == (4, "up", False, 64, 0.1)
    d = MoSAConfig(num_experts=2, split="both", towers=["text"]).to_dict()
    assert d["method"] == "mosa" and vpeft.PeftConfig.from_dict(d) == MoSAConfig(num_experts=2, split="both",
                                                                                 towers=["text"])
    assert AdaptFormerConfig().to_dict()["method"] == "adaptformer"


def test_consistency_loss_is_symmetric_kl():
    g = torch.Generator().manual_seed(9)
    a = torch.randn(5, 7, generator=g, requires_grad=True)
    b = torch.randn(5, 7, generator=g)
    pa, pb = F.softmax(a, -1), F.softmax(b, -1)
    kl = lambda p, q: (p * (p.log() - q.log())).sum() / p.shape[0]  # noqa: E731  KL(p || q), batch mean
    expected = 0.5 * (kl(pb, pa) + kl(pa, pb))
    loss = consistency_loss(a, b)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert abs(consistency_loss(b, b).item()) < 1e-7
    loss.backward()
    assert a.grad is not None and torch.count_nonzero(a.grad) > 0
