"""UniPT numerics: no backbone activation is saved, no backbone gradient, the memory-lean autograd functions against
plain autograd (values, gradients, finite differences), the interaction and aggregation against a hand computation,
causality on text towers, the parameter formula (tiny and ViT-B/16), training, config errors."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import make_clip, make_timm, rel_err

import vpeft
from vpeft.methods._side import tap_key
from vpeft.methods.layers import AdapterLayer, unwrap
from vpeft.methods.unipt import ParallelNetwork, UniPTConfig, interaction_reference, parallel_interaction

IMG = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _tokens(seed: int = 4) -> torch.Tensor:
    t = torch.randint(1, 98, (2, 16), generator=torch.Generator().manual_seed(seed))
    t[:, 12] = 99
    return t


def unipt_model(model=None, **kw):
    model = make_timm() if model is None else model
    return vpeft.get_peft_model(model, UniPTConfig(**kw), trainable_extra=["head"])


def use_reference(pm, key: str = "unipt") -> None:
    """Route the fusion through the plain-autograd formulation."""
    net = pm.shared[key]
    net.fuse = functools.partial(type(net).fuse, net, reference=True)


# --- memory: nothing inside the backbone is kept for backward ---------------------------------------------------------

def saved_storages(net, run):
    """Storages autograd saves during ``run()`` (data_ptr -> (shape, bytes), parameters left out), and every tensor
    produced inside a backbone block, kept alive so that its address cannot be reused by later allocations."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved, internal = {}, {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = (tuple(t.shape), s.nbytes())
        return t

    def keep(_m, _i, out):
        for o in out if isinstance(out, tuple) else (out,):
            if isinstance(o, torch.Tensor):
                internal[o.untyped_storage().data_ptr()] = o

    hooks = [m.register_forward_hook(keep) for blk in net.base_model.blocks for m in unwrap(blk).modules()
             if m is not unwrap(blk)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    for h in hooks:
        h.remove()
    return saved, internal


@pytest.mark.parametrize("layers", [None, [1]])
def test_no_backbone_activation_is_saved(layers):
    pm = unipt_model(layers=layers)
    pm.train()
    finals = []
    pm.adapter_layers()["norm"].base_layer.register_forward_hook(lambda m, i, o: finals.append(o))
    saved, internal = saved_storages(pm, lambda: pm(IMG).square().mean())
    assert not set(saved) & set(internal)
    # the only (B, L, D)-shaped storages held: the taps (inputs of the selected blocks) and the last-layer features
    allowed = {pm.ctx.get(tap_key("unipt", i, "in")).untyped_storage().data_ptr() for i in (layers or [0, 1])}
    allowed.add(finals[0].untyped_storage().data_ptr())
    wide = {p for p, (shape, _) in saved.items() if shape == (2, 17, 64)}
    assert wide <= allowed
    total = sum(n for _, n in saved.values())

    # the memory-lean functions hold less than plain autograd does
    ref = unipt_model(layers=layers)
    ref.train()
    use_reference(ref)
    ref_saved, _ = saved_storages(ref, lambda: ref(IMG).square().mean())
    assert total < sum(n for _, n in ref_saved.values())
    # and far less than LoRA, whose backward runs through the backbone
    lora = vpeft.get_peft_model(make_timm(), vpeft.LoraConfig(r=8), trainable_extra=["head"])
    lora.train()
    lora_saved, _ = saved_storages(lora, lambda: lora(IMG).square().mean())
    assert total < 0.5 * sum(n for _, n in lora_saved.values())


def test_backward_leaves_backbone_without_gradients():
    pm = unipt_model()
    pm.train()
    pm(IMG).logsumexp(-1).mean().backward()
    for name, p in pm.base_model.named_parameters():
        if name.startswith("head."):
            assert p.grad is not None
        else:
            assert p.grad is None, name
    assert all(p.grad is not None for p in pm.shared.parameters())


# --- the memory-lean autograd functions against plain autograd -----------------------------------------------------

@pytest.mark.parametrize("case", ["timm", "clip_text"])
def test_fused_forward_and_gradients_equal_plain_autograd(case):
    results = []
    for reference in (False, True):
        if case == "timm":
            pm = vpeft.get_peft_model(make_timm(), UniPTConfig(r=2))
            run = lambda m: m.forward_features(IMG)  # noqa: E731
        else:
            pm = vpeft.get_peft_model(make_clip(), UniPTConfig(r=2, towers=["text"]))
            run = lambda m: m.encode_text(_tokens())  # noqa: E731
        if reference:
            use_reference(pm)
        pm.train()
        out = run(pm)
        out.mul(torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in pm.shared.named_parameters()}))
    (y0, g0), (y1, g1) = results
    assert rel_err(y0, y1) < 1e-5
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("causal", [False, True])
def test_parallel_interaction_gradcheck(causal):
    g = torch.Generator().manual_seed(0)
    n, B, L, D, d = 2, 1, 4, 5, 2
    taps = [torch.randn(B, L, D, generator=g, dtype=torch.float64) for _ in range(n)]
    a = torch.randn(B, L, d, generator=g, dtype=torch.float64, requires_grad=True)
    # one weight per layer, or per token and layer (causal towers)
    w = torch.rand(B, L if causal else 1, n, generator=g, dtype=torch.float64).softmax(-1).requires_grad_(True)
    ps = [torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(True)
          for _ in range(n) for shape in ((d, D), (d,))]

    def fused(a, w, *ps):
        downs = [SimpleNamespace(weight=wt, bias=b) for wt, b in zip(ps[0::2], ps[1::2])]
        return parallel_interaction(a, w, taps, downs, causal)

    def plain(a, w, *ps):
        f = torch.stack([F.linear(t.relu(), wt, b) for t, wt, b in zip(taps, ps[0::2], ps[1::2])])
        return interaction_reference(a, f, w, causal)

    assert torch.autograd.gradcheck(fused, (a, w, *ps), eps=1e-6, atol=1e-6)
    # an anchor token whose scores are all zero: an all-zero map row (the L1 floor), the same subgradient as autograd
    a0 = a.detach().clone()
    a0[:, 2] = 0.0
    a0.requires_grad_(True)
    for inputs in ((a, w, *ps), (a0, w, *ps)):
        out, ref = fused(*inputs), plain(*inputs)
        torch.testing.assert_close(out, ref)
        gout = torch.randn(out.shape, generator=g, dtype=torch.float64)
        torch.testing.assert_close(torch.autograd.grad(out, inputs, gout), torch.autograd.grad(ref, inputs, gout))


# --- interaction and aggregation against a hand computation ----------------------------------------------------------

def _hand(y, taps, net: ParallelNetwork, causal: bool) -> torch.Tensor:
    """UniPT's equations written token by token (batch of one); causal: maps and token means over tokens <= t."""
    def lin(m, v):
        return [sum(m.weight[o, k].item() * v[k] for k in range(len(v))) + m.bias[o].item()
                for o in range(m.weight.shape[0])]

    def mean(rows, t):  # mean of rows[0..t] (causal) or of all rows
        rows = rows[:t + 1] if causal else rows
        return [sum(r[k] for r in rows) / len(rows) for k in range(len(rows[0]))]

    relu = lambda v: [max(t, 0.0) for t in v]  # noqa: E731
    L = y.shape[1]
    a = [lin(net.anchor, relu(y[0, t].tolist())) for t in range(L)]
    d = len(a[0])
    fs = [[lin(net.downs[str(i)], relu(tap[0, t].tolist())) for t in range(L)] for i, tap in zip(net.layers, taps)]
    out = []
    for t in range(L):
        am = mean(a, t)
        conf = [lin(net.gate, [am[k] * fm for k, fm in enumerate(mean(f, t))])[0] for f in fs]
        e = [math.exp(c - max(conf)) for c in conf]
        agg = [0.0] * d
        for f, ei in zip(fs, e):
            scores = [max(sum(a[t][k] * f[j][k] for k in range(d)), 0.0) if (j <= t or not causal) else 0.0
                      for j in range(L)]
            z = max(sum(scores), 1e-6)
            for k in range(d):
                agg[k] += ei / sum(e) * (sum(scores[j] / z * f[j][k] for j in range(L)) + f[t][k])
        up = lin(net.up, relu(agg))
        out.append([y[0, t, c].item() + up[c] for c in range(len(up))])
    return torch.tensor([out])


@pytest.mark.parametrize("causal", [False, True])
def test_fusion_matches_hand_computation(causal):
    torch.manual_seed(0)
    net = ParallelNetwork(width=4, d=2, layers=[0, 2], causal=causal, like=torch.zeros(1))
    taps = {i: torch.randn(1, 5, 4) for i in (0, 2)}
    y = torch.randn(1, 5, 4)
    tap = lambda i, which: taps[i]  # noqa: E731
    expected = _hand(y, [taps[0], taps[2]], net, causal)
    with torch.no_grad():
        assert rel_err(net.fuse(tap, None, y), expected) < 1e-5
        assert rel_err(net.fuse(tap, None, y, reference=True), expected) < 1e-5


def test_taps_are_block_inputs_and_anchor_is_the_final_norm_output():
    pm = unipt_model()
    pm.eval()
    with torch.no_grad():
        feats = pm.forward_features(IMG)
        base = pm.base_model
        e = base.norm_pre(base._pos_embed(base.patch_embed(IMG)))
        h0 = unwrap(base.blocks[0])(e)
        y = unwrap(base.norm)(unwrap(base.blocks[1])(h0))
        assert torch.equal(pm.ctx.get(tap_key("unipt", 0, "in")), e)
        assert torch.equal(pm.ctx.get(tap_key("unipt", 1, "in")), h0)
        expected = pm.shared["unipt"].fuse(lambda i, w: {0: e, 1: h0}[i], None, y, reference=True)
    assert rel_err(feats, expected) < 1e-5


def test_text_tower_fusion_is_causal():
    pm = vpeft.get_peft_model(make_clip(), UniPTConfig(towers=["text"]))
    captured = []
    pm.adapter_layers()["ln_final"].register_forward_hook(lambda m, i, o: captured.append(o))
    t1 = _tokens()
    t2 = t1.clone()
    t2[:, 7:] = (t2[:, 7:] + 5) % 98 + 1
    with torch.no_grad():
        pm.encode_text(t1)
        pm.encode_text(t2)
    a, b = captured
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


# --- parameter count --------------------------------------------------------------------------------------------------

def unipt_params(D: int, n: int, r: int) -> int:
    """The docstring's formula."""
    d = D // r
    return (n + 1) * (D * d + d) + (d + 1) + (d * D + D)


@pytest.mark.parametrize("r,layers", [(2, None), (1, None), (4, [1]), (8, [0, 1])])
def test_trainable_parameters_match_formula_tiny(r, layers):
    pm = vpeft.get_peft_model(make_timm(), UniPTConfig(r=r, layers=layers))
    assert pm.num_parameters(True) == unipt_params(64, len(layers or [0, 1]), r)


def test_trainable_parameters_vit_b16():
    model = vpeft.create_backbone("timm:vit_base_patch16_224")
    pm = vpeft.get_peft_model(model, UniPTConfig())
    assert unipt_params(768, 12, 2) == 4_134_913
    assert pm.num_parameters(True) == 4_134_913


# --- training ---------------------------------------------------------------------------------------------------------

def test_training_reduces_loss_on_a_separable_task():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 3, 32, 32, generator=g)
    y = torch.arange(8) % 2
    x[y == 1, :, :16] += 1.0  # class 1: brighter top half
    pm = vpeft.get_peft_model(make_timm(num_classes=2), UniPTConfig(), trainable_extra=["head"])
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(pm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# --- config errors ----------------------------------------------------------------------------------------------------

BAD = [
    (dict(r=0), "UniPTConfig.r"),
    (dict(r=2.0), "UniPTConfig.r"),
    (dict(r=3), r"r=3 must divide the tower's width 64; valid r: \[1, 2, 4, 8, 16, 32, 64\]"),
    (dict(targets=["block"]), "UniPTConfig.targets must be None"),
    (dict(layers=[]), "UniPTConfig.layers"),
    (dict(layers=[-3]), "out of range"),
    (dict(towers=["text"]), "no tower 'text'"),
]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before):
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kw,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_config_errors_raise_before_mutation(kw, match):
    model = make_timm()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        vpeft.get_peft_model(model, [vpeft.LoraConfig(r=2), UniPTConfig(**kw)])
    _assert_untouched(model, before)


@pytest.mark.parametrize("make,kw,match", [
    (lambda: make_clip(), dict(towers=["visual", "text"]), "exactly one tower"),
    (lambda: make_timm(global_pool="avg"), dict(), "after pooling"),
])
def test_unsupported_towers_raise_before_mutation(make, kw, match):
    model = make()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        vpeft.get_peft_model(model, UniPTConfig(**kw))
    _assert_untouched(model, before)
